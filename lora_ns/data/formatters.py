"""Formatters: small pure functions from one raw row to one canonical example, registered by name.

A formatter's `kind` fixes the shape it returns: ``prompt_completion`` {prompt, completion}, ``messages``
{messages}, ``text`` {text}, ``pair`` {sentence1, sentence2 | None, label}; the preference kinds are in
`lora_ns.data.preference`. It gets a dict keyed by its field names; the loader picks each field's column
(``dataset.columns``, then the field's name, then its ``aliases``) and adds the file:line to a `RowError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lora_ns.errors import suggest

Row = dict[str, Any]
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "tool": "tool", "function": "tool"}


class RowError(ValueError):
    """A row a formatter cannot use: the field (formatter field name) and what is wrong with it."""

    def __init__(self, field: str, message: str, fix: str = ""):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.fix = field, message, fix or "fix or drop that row"


@dataclass(frozen=True)
class Formatter:
    name: str
    kind: str
    fields: tuple[str, ...]
    fn: Callable[[Row], Row]
    optional: tuple[str, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __call__(self, row: Row) -> Row:
        return self.fn(row)

    @property
    def all_fields(self) -> tuple[str, ...]:
        return self.fields + self.optional


FORMATTERS: dict[str, Formatter] = {}
FormatFn = Callable[[Row], Row]


def formatter(name: str, kind: str, fields: tuple[str, ...], optional: tuple[str, ...] = (),
              aliases: Mapping[str, tuple[str, ...]] | None = None) -> Callable[[FormatFn], FormatFn]:
    def register(fn: FormatFn) -> FormatFn:
        FORMATTERS[name] = Formatter(name, kind, fields, fn, optional, dict(aliases or {}))
        return fn
    return register


# --- value checks shared by the formatters ----------------------------------------------------------

def text_value(row: Row, name: str, required: bool = True) -> str | None:
    """A string field; numbers are accepted and written as text, None is an error when required."""
    value = row.get(name)
    if value is None:
        if required:
            raise RowError(name, "missing value", "fill it in or drop the row")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(name, f"expected text, got {type(value).__name__}",
                       "write the value as a string, or map another column with dataset.columns")
    return value if isinstance(value, str) else str(value)


def whole_number(value: Any) -> int | None:
    """An int, a float with no fraction, or the text of one ("1", "1.0": pandas writes a column of ints with
    gaps as floats) as an int; anything else (a bool too) None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _content_text(content: Any, which: str, name: str) -> Any:
    """Content given as a list of parts (the OpenAI format: [{"type": "text", "text": "..."}]) as one text,
    and a number as text (as `text_value` reads one: `datasets` decodes a reply "4" to 4 when other rows of
    the column hold part lists); anything else is returned as it is, for the caller's checks."""
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if not isinstance(content, list) or not content or not all(isinstance(p, dict) for p in content):
        return content
    if other := sorted({str(p.get("type")) for p in content} - {"text"}):
        raise RowError(name, f"{which} has {', '.join(other)} parts: lora_ns trains on text only",
                       "keep the text parts, or drop the row")
    if not all(isinstance(p.get("text"), str) for p in content):
        raise RowError(name, f"{which} has a text part without a \"text\" string", "fix or drop the row")
    return "".join(p["text"] for p in content)


def check_messages(value: Any, name: str, needs_reply: bool = True) -> list[dict[str, str]]:
    """A list of {role, content} chat messages; for training chats, with at least one assistant turn (else
    nothing is trained)."""
    if not isinstance(value, list) or not value:
        raise RowError(name, "expected a non-empty list of {role, content} messages",
                       'write [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    messages = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError(name, f"message {i} needs 'role' and 'content'",
                           'write each message as {"role": "user", "content": "..."}')
        role = message["role"]
        content = _content_text(message["content"], f"message {i} ({role})", name)
        if role not in ROLES:
            raise RowError(name, f"message {i} has unknown role {role!r}", suggest(str(role), ROLES))
        if not isinstance(content, str):
            got = "null" if content is None else type(content).__name__
            raise RowError(name, f"message {i} ({role}) content must be text, got {got}",
                           'write the text as "content": "...", or drop the message or the row')
        messages.append({"role": role, "content": content})
    if needs_reply and not any(m["role"] == "assistant" for m in messages):
        raise RowError(name, "no assistant message, so nothing to train on", "drop the row or add the reply")
    return messages


# --- generic formatters -----------------------------------------------------------------------------

def _prompt_completion(name: str, prompt: str, completion: str) -> None:
    """Register a formatter whose two fields are the prompt and the completion, text kept byte for byte."""
    formatter(name, "prompt_completion", (prompt, completion))(
        lambda row: {"prompt": text_value(row, prompt), "completion": text_value(row, completion)})


_prompt_completion("prompt_completion", "prompt", "completion")
_prompt_completion("gsm8k", "question", "answer")  # the whole worked answer (``#### N``): evaluate finds N
_prompt_completion("metamath", "query", "response")  # ``type`` and ``original_question`` stay as metadata


@formatter("text", "text", ("text",))
def text(row: Row) -> Row:
    return {"text": text_value(row, "text")}


@formatter("messages", "messages", ("messages",))
def messages(row: Row) -> Row:
    """Chat rows; loss on every assistant turn (see `lora_ns.data.render.sft_defaults`)."""
    return {"messages": check_messages(row.get("messages"), "messages")}


FORMATTERS["code_feedback"] = Formatter("code_feedback", "messages", ("messages",), messages)  # multi-turn


@formatter("sharegpt", "messages", ("conversations",))
def sharegpt(row: Row) -> Row:
    """ShareGPT ``conversations: [{from, value}]`` (from: system/human/gpt) -> chat messages."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("conversations", "expected a non-empty list of {from, value} turns")
    converted = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError("conversations", f"turn {i} needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError("conversations", f"turn {i} has unknown speaker 'from: {turn['from']}'",
                           "use system, human or gpt")
        if turn["value"] is None or isinstance(turn["value"], (bool, dict)):  # said in ShareGPT's words
            got = "null" if turn["value"] is None else type(turn["value"]).__name__
            raise RowError("conversations", f"turn {i} ({turn['from']}) value must be text, got {got}",
                           'write the text as "value": "...", or drop the turn or the row')
        converted.append({"role": role, "content": turn["value"]})
    return {"messages": check_messages(converted, "conversations")}


@formatter("alpaca", "prompt_completion", ("instruction", "output"), optional=("input",))
def alpaca(row: Row) -> Row:
    """Instruction, then the input (when there is one) after a blank line. Text is kept byte for byte."""
    instruction, extra = text_value(row, "instruction"), text_value(row, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return {"prompt": prompt, "completion": text_value(row, "output")}


FORMATTERS["alpaca_zh"] = Formatter("alpaca_zh", "prompt_completion", ("instruction", "output"), alpaca,
                                    ("input",))


@formatter("pair", "pair", ("sentence1", "label"), optional=("sentence2",),
           aliases={"sentence1": ("sentence", "text"), "label": ("labels",)})
def pair(row: Row) -> Row:
    """Sentence (or sentence pair) classification; the label stays as written (int or class name)."""
    label = row.get("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise RowError("label", "missing label")
    return {"sentence1": text_value(row, "sentence1"),
            "sentence2": text_value(row, "sentence2", required=False), "label": label}


@formatter("glue_mrpc", "pair", ("sentence1", "sentence2", "label"),
           aliases={"sentence1": ("#1 String",), "sentence2": ("#2 String",), "label": ("Quality",)})
def glue_mrpc(row: Row) -> Row:
    """GLUE MRPC, from the HF schema or the original TSV (``Quality``, ``#1 String``, ``#2 String``);
    labels are 0 / 1 (as a bool, a number or its text)."""
    label = row.get("label")
    if label is None:
        raise RowError("label", "missing label")
    value = label if isinstance(label, bool) else whole_number(label)
    if value not in (0, 1):
        raise RowError("label", f"unknown label {label!r}",
                       "MRPC labels are 0 (not equivalent) or 1 (equivalent)")
    return {"sentence1": text_value(row, "sentence1"), "sentence2": text_value(row, "sentence2"),
            "label": int(value)}
