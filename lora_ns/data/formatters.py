"""Formatters: small pure functions from one raw row to one canonical example, registered by name.

Each formatter declares its `kind`, which fixes the shape it returns:

- ``prompt_completion``: {"prompt": str, "completion": str}   (single-turn SFT)
- ``messages``: {"messages": [{"role": ..., "content": ...}, ...]}   (multi-turn chat)
- ``text``: {"text": str}   (continued pretraining)
- ``pair``: {"sentence1": str, "sentence2": str | None, "label": int}   (classification)

`fields` are the columns it reads; a recipe's ``dataset.columns`` renames them for data whose
columns are named otherwise. Rendering to chat/template form happens later (`lora_ns.data.render`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Row = dict[str, Any]


@dataclass(frozen=True)
class Formatter:
    name: str
    kind: str
    fields: tuple[str, ...]
    fn: Callable[[Row], Row]

    def __call__(self, row: Row) -> Row:
        return self.fn(row)


FORMATTERS: dict[str, Formatter] = {}


def formatter(name: str, kind: str, fields: tuple[str, ...]) -> Callable[[Callable[[Row], Row]], Callable[[Row], Row]]:
    """Register a formatter under `name`."""
    def register(fn: Callable[[Row], Row]) -> Callable[[Row], Row]:
        FORMATTERS[name] = Formatter(name, kind, fields, fn)
        return fn
    return register


def get_formatter(name: str) -> Formatter:
    return FORMATTERS[name]


@formatter("prompt_completion", "prompt_completion", ("prompt", "completion"))
def prompt_completion(row: Row) -> Row:
    return {"prompt": row["prompt"], "completion": row["completion"]}


@formatter("text", "text", ("text",))
def text(row: Row) -> Row:
    return {"text": row["text"]}


@formatter("messages", "messages", ("messages",))
def messages(row: Row) -> Row:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}


@formatter("gsm8k", "prompt_completion", ("question", "answer"))
def gsm8k(row: Row) -> Row:
    return {"prompt": row["question"], "completion": row["answer"]}


@formatter("glue_mrpc", "pair", ("sentence1", "sentence2", "label"))
def glue_mrpc(row: Row) -> Row:
    return {"sentence1": row["sentence1"], "sentence2": row["sentence2"], "label": int(row["label"])}


@formatter("metamath", "prompt_completion", ("query", "response"))
def metamath(row: Row) -> Row:
    return {"prompt": row["query"], "completion": row["response"]}


@formatter("code_feedback", "messages", ("messages",))
def code_feedback(row: Row) -> Row:
    return messages(row)


@formatter("alpaca", "prompt_completion", ("instruction", "input", "output"))
def alpaca(row: Row) -> Row:
    prompt = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return {"prompt": prompt, "completion": row["output"]}


FORMATTERS["alpaca_zh"] = Formatter("alpaca_zh", "prompt_completion", ("instruction", "input", "output"), alpaca)
