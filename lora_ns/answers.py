"""Final-answer extraction for math datasets (GSM8K, MetaMath).

The answer is the first number after a marker (``####``, "The answer is", ``\\boxed{``), else the
last number in the text. Numbers are returned in a canonical form so that equal values compare
equal as strings: thousands commas and currency signs dropped, negatives and decimals kept,
trailing zeros removed ("1,080" -> "1080", "$1,234.50" -> "1234.5", "-3.0" -> "-3").
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A minus counts only when it is not the operator of "5-3"; commas only in thousands groups,
# so "1,2,3" is three numbers, not 123.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.)])[-\u2212])?[$€£¥]?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_MARKERS = re.compile(r"####|the (?:final )?answer is|\\boxed\{", re.IGNORECASE)


def canonical_number(text: str) -> str | None:
    """'1,080' -> '1080', '3.50' -> '3.5', '-0' -> '0'; None when `text` is not a number."""
    cleaned = text.strip().replace(",", "").replace("\u2212", "-").lstrip("$€£¥").replace("-$", "-")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _numbers(text: str) -> list[str]:
    found = []
    for match in _NUMBER.finditer(text):
        sign = "-" if match.group("sign") else ""
        number = canonical_number(sign + match.group("digits"))
        if number is not None:
            found.append(number)
    return found


def extract_answer(text: str | None) -> str | None:
    """The final numeric answer in a model output or reference solution, canonical; None if there is none."""
    if not text:
        return None
    marker = _MARKERS.search(text)
    if marker:
        after = _numbers(text[marker.end():])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def same_answer(prediction: str | None, reference: str | None) -> bool:
    """True when both texts have a final number and the numbers are equal."""
    a, b = extract_answer(prediction), extract_answer(reference)
    return a is not None and a == b
