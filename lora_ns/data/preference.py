"""Formatters for dpo, orpo (``preference``: prompt, chosen, rejected), kto (``unpaired``: prompt,
completion, label) and grpo (``prompt_only``: prompt, answer -- the reference TRL passes to the rewards).
``prompt`` is always the message list before the answer. Layouts read: TRL's own, UltraFeedback (two
conversations sharing the prompt) and HH-RLHF (two "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts).
"""

from __future__ import annotations

import re
from typing import Any

from lora_ns.data.formatters import Row, RowError, check_messages, formatter, text_value, whole_number
from lora_ns.data.render import split_last_reply

PREFERENCE_KINDS = ("preference", "unpaired", "prompt_only")
Messages = list[dict[str, str]]


# --- value checks -----------------------------------------------------------------------------------

def _messages(value: Any, name: str) -> Messages:
    """A string (one user turn) or a list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(name, "empty text", "fill it in or drop the row")
        return [{"role": "user", "content": value}]
    return check_messages(value, name, needs_reply=False)


def _reply(value: Any, name: str) -> str:
    """A completion: text, or a list whose last message is the assistant's reply. Empty is an error."""
    if isinstance(value, list):
        turns = _messages(value, name)
        if turns[-1]["role"] != "assistant":
            raise RowError(name, "the last message is not an assistant reply",
                           "end it with the assistant turn")
        value = turns[-1]["content"]
    text = text_value({name: value}, name)
    if not text.strip():
        raise RowError(name, "empty completion, so there is nothing to prefer", "fill it in or drop the row")
    return text


def _split_last_reply(conversation: Any, name: str) -> tuple[Messages, str]:
    """(messages before the last assistant turn, that turn's text)."""
    prompt, reply = split_last_reply(_messages(conversation, name))
    if reply is None or not prompt:
        raise RowError(name, "no assistant reply after a prompt", "give the conversation ending in the reply")
    return prompt, _reply(reply, name)


def _pair(prompt: Messages, chosen: str, rejected: str) -> Row:
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is the same as 'chosen', so there is no preference to learn",
                       "drop the row or fix the pair")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --- formatters ------------------------------------------------------------------------------------

@formatter("preference", "preference", ("chosen", "rejected"), optional=("prompt",))
def preference(row: Row) -> Row:
    """TRL's preference rows: explicit ``prompt``, or an implicit one shared by two conversations."""
    if row.get("prompt") is not None:
        return _pair(_messages(row["prompt"], "prompt"), _reply(row.get("chosen"), "chosen"),
                     _reply(row.get("rejected"), "rejected"))
    return ultrafeedback(row)


@formatter("ultrafeedback", "preference", ("chosen", "rejected"))
def ultrafeedback(row: Row) -> Row:
    """``chosen``/``rejected`` are whole conversations that share everything but the last reply."""
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise RowError(name, "missing value", "fill it in or drop the row")
    prompt, chosen = _split_last_reply(row["chosen"], "chosen")
    other, rejected = _split_last_reply(row["rejected"], "rejected")
    if other != prompt:
        raise RowError("rejected", "its conversation before the last reply differs from 'chosen'",
                       "both must share the prompt turns")
    return _pair(prompt, chosen, rejected)


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_turns(text: Any, name: str) -> Messages:
    value = text_value({name: text}, name)
    parts = _HH_TURN.split("\n\n" + value.lstrip("\n"))
    if len(parts) < 3 or parts[0].strip():
        raise RowError(name, "not an HH-RLHF transcript ('\\n\\nHuman: ... \\n\\nAssistant: ...')")
    return [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in zip(parts[1::2], parts[2::2])]


@formatter("hh_rlhf", "preference", ("chosen", "rejected"))
def hh_rlhf(row: Row) -> Row:
    """Anthropic HH-RLHF: two transcripts sharing the dialogue up to the last "Assistant:" turn."""
    return ultrafeedback({name: _hh_turns(row.get(name), name) for name in ("chosen", "rejected")})


_TRUE, _FALSE = {"true", "1", "yes", "good", "desirable"}, {"false", "0", "no", "bad", "undesirable"}


@formatter("kto", "unpaired", ("prompt", "completion", "label"))
def kto(row: Row) -> Row:
    """KTO's unpaired rows: one completion and whether it is desirable (true/false, 1/0)."""
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in _TRUE | _FALSE:
        label = label.strip().lower() in _TRUE
    elif whole_number(label) in (0, 1):
        label = bool(whole_number(label))
    if not isinstance(label, bool):
        raise RowError("label", f"expected true or false, got {label!r}", "true = a desirable completion")
    return {"prompt": _messages(row.get("prompt"), "prompt"),
            "completion": _reply(row.get("completion"), "completion"), "label": label}


@formatter("prompt_only", "prompt_only", ("prompt",), optional=("answer",))
def prompt_only(row: Row) -> Row:
    """GRPO prompts; ``answer`` (optional) is the reference the rewards compare against."""
    return {"prompt": _messages(row.get("prompt"), "prompt"),
            "answer": text_value(row, "answer", required=False)}


@formatter("gsm8k_prompt", "prompt_only", ("question", "answer"))
def gsm8k_prompt(row: Row) -> Row:
    """GSM8K for GRPO: the question is the prompt, the worked answer (ending ``#### N``) the reference."""
    return {"prompt": _messages(text_value(row, "question"), "question"), "answer": text_value(row, "answer")}
