"""Final-answer extraction and comparison for math datasets (GSM8K, MetaMathQA incl. its MATH rows).

Which answer: GSM8K's first ``####`` (its solutions say "the final answer is 15 gallons * 8 pints /
gallon = 120 pints" before "#### 120", and a model running on into a made-up next question has answered
before it); else the LAST marker ("The answer is", "answer:", ``\\boxed{}``); else the last number.
Numbers compare canonically, expressions through Hugging Face's math-verify. Its timeout uses
``signal.alarm`` (main thread only); elsewhere only expressions of at most `MAX_EXPRESSION_CHARS` go to
sympy (longer ones compare as text), so a huge expression cannot hang an evaluation.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

# A minus counts only when it is not the operator of "5-3"; commas only in thousands groups,
# so "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.)])[-\u2212])?[$€£¥]?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_GSM8K_MARKER = re.compile("####")
_MARKERS = re.compile(r"the (?:final )?answer is:?|\banswer:|\\boxed\{", re.IGNORECASE)
# Signs that an answer is a LaTeX expression for math-verify rather than one number; a plain "3/4".
_LATEX = re.compile(r"\\[a-zA-Z]|\^|\{|^[(\[].*,.*[)\]]$")  # commands, powers, groups, (1, 2) / [0, 1)
_FRACTION = re.compile(r"(?<![\w.])-?\d+\s*/\s*\d+(?![\w.])")
_SENTENCE_END = re.compile(r"\.(?:\s|$)|\n")
MAX_EXPRESSION_CHARS = 200
TIMEOUT_SECONDS = 5


def canonical_number(text: str) -> str | None:
    """'1,080' -> '1080', '3.50' -> '3.5', '-0' -> '0'; None when `text` is not a number."""
    cleaned = text.strip().replace(",", "").replace("\u2212", "-").lstrip("$€£¥").replace("-$", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = (canonical_number("-" * bool(m["sign"]) + m["digits"]) for m in _NUMBER.finditer(text))
    return [number for number in found if number is not None]


def _braced(text: str, start: int) -> str:
    """The content of the brace group opened just before `start` (to the end of `text` if unclosed)."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


def _statement(text: str) -> str:
    """What follows "The answer is" / "####": to the end of its sentence or line, after its last '='."""
    text = text.strip()
    if text.startswith("$") and "$" in text[1:]:
        text = text[1:text.index("$", 1)]  # "$\frac{1}{2}$." -> the math part
    boxed = re.search(r"\\boxed\{", text)
    if boxed:
        text = _braced(text, boxed.end())
    else:
        end = _SENTENCE_END.search(text)
        text = text[:end.start()] if end else text
    return text.rsplit("=", 1)[-1]


def _answer(span: str) -> str | None:
    """A canonical number, or the expression's LaTeX; None when `span` holds neither."""
    span = span.strip().strip("$").strip().rstrip(".,;").strip()
    if _LATEX.search(span):
        return span
    fraction = _FRACTION.search(span)
    if fraction:
        return fraction.group().replace(" ", "")
    numbers = _numbers(span)
    return numbers[0] if numbers else None


def extract_answer(text: str | None) -> str | None:
    """The final answer (canonical number or LaTeX) in a model output or reference solution, or None."""
    if not text:
        return None
    marker = _GSM8K_MARKER.search(text) or next(reversed(list(_MARKERS.finditer(text))), None)
    if marker:
        rest = text[marker.end():]
        span = _braced(rest, 0) if marker.group().endswith("{") else _statement(rest)
        found = _answer(span)
        if found is not None:
            return found
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers are equal: exact for numbers, by math-verify for expressions (the
    reference as gold: its check is not symmetric)."""
    if prediction is None or reference is None:
        return False
    if prediction == reference:
        return True
    if canonical_number(prediction) is not None and canonical_number(reference) is not None:
        return False  # two different canonical numbers: no need for sympy
    if max(len(prediction), len(reference)) > MAX_EXPRESSION_CHARS:
        return False  # compared as text, and they differ
    from math_verify import parse, verify

    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    gold, pred = (parse(f"${answer}$", parsing_timeout=timeout) for answer in (reference, prediction))
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))


def same_answer(prediction: str | None, reference: str | None) -> bool:
    """True when both texts have a final answer and the answers are equal."""
    return answers_match(extract_answer(prediction), extract_answer(reference))
