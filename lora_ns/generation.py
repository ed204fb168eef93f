"""Generation and classification with a loaded model (`lora_ns.inference_model.load_for_inference`).

What `infer`, `evaluate`, `compare` and `demo` share: prompts read from .txt/.jsonl files, rendered as
training rendered them, generated in left-padded batches (``model.generate``), or classified with every
class probability. No command imports another command: they all import this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lora_ns.errors import Problem, UserError

PromptInput = str | list[dict[str, str]]


# --- input files -------------------------------------------------------------------------------

def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a .txt (one prompt a line) or .jsonl file ("prompt", "messages", "text" or "sentence1" fields)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(Problem(str(path), "--input-file", "file not found", "check the path"))
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), "--input-file", f"cannot read it ({err})", "save it as UTF-8 text"))
    if file.suffix not in (".jsonl", ".json"):
        rows = [{"prompt": line} for line in lines if line.strip()]
        if not rows:
            raise UserError(Problem(str(path), "--input-file", "no prompts in the file", "add one prompt a line"))
        return rows
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(Problem(str(path), "", f"invalid JSON ({err.msg})", "write one JSON object a line", number))
        if not isinstance(row, dict) or not any(k in row for k in ("prompt", "messages", "text", "sentence1")):
            raise UserError(Problem(str(path), "prompt", "row has no prompt",
                                    'give each line a "prompt" (or "messages") field', number))
        rows.append(row)
    if not rows:
        raise UserError(Problem(str(path), "", "no prompts in the file", "add one prompt a line"))
    return rows


def prompt_of(row: dict[str, Any]) -> PromptInput:
    """The generation input of a row: its messages (up to the last user turn) or its prompt text."""
    if "messages" in row and "prompt" not in row:
        messages = list(row["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages
    return row.get("prompt", row.get("text", row.get("sentence1", "")))


# --- running the model -------------------------------------------------------------------------

def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def generation_config(loaded, max_new_tokens: int, greedy: bool, temperature: float, top_p: float):
    """A copy of the model's GenerationConfig with our options; stops at the tokenizer's eos too."""
    import copy

    config = copy.deepcopy(loaded.model.generation_config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [e for e in [*eos, loaded.tokenizer.eos_token_id] if e is not None]
    sample = not greedy and temperature > 0
    config.update(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=loaded.tokenizer.pad_token_id,
                  eos_token_id=sorted(set(eos)) or None, temperature=temperature if sample else None,
                  top_p=top_p if sample else None, top_k=None if not sample else config.top_k)
    return config


def generate(loaded, prompts: Sequence[PromptInput], *, recipe=None, max_new_tokens: int = 256,
             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 8,
             progress: bool = True, seed: int | None = None) -> list[str]:
    """Completions for `prompts` (rendered with `recipe`, default the model's own), in input order."""
    import torch
    from tqdm.auto import tqdm

    from lora_ns.inference_model import render_prompt

    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    tokenizer, recipe = loaded.tokenizer, recipe or loaded.recipe
    tokenizer.padding_side = "left"
    rendered = [render_prompt(tokenizer, p, recipe) for p in prompts]
    encoded = [tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in rendered]
    config = generation_config(loaded, max_new_tokens, greedy, temperature, top_p)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(encoded)
    for batch in tqdm(_batches(order, batch_size), desc="generating", unit="batch", disable=not progress):
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            out = loaded.model.generate(**inputs, generation_config=config)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


def label_names(model) -> list[str]:
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]


def classify(loaded, inputs: Sequence[str | tuple[str, str | None]], *, batch_size: int = 16,
             progress: bool = True) -> list[dict[str, Any]]:
    """For each text (or sentence pair): {"label", "label_id", "probabilities": {label name: p}}."""
    import torch
    from tqdm.auto import tqdm

    names = label_names(loaded.model)
    pairs = [x if isinstance(x, tuple) else (x, None) for x in inputs]
    results: list[dict[str, Any]] = []
    for batch in tqdm(_batches(list(range(len(pairs))), batch_size), desc="classifying", unit="batch",
                      disable=not progress):
        first = [pairs[i][0] for i in batch]
        second = [pairs[i][1] for i in batch]
        enc = loaded.tokenizer(first, second if all(s is not None for s in second) else None, padding=True,
                               truncation=True, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            probs = torch.softmax(loaded.model(**enc).logits.float(), dim=-1)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": names[best], "label_id": best,
                            "probabilities": {name: round(p, 6) for name, p in zip(names, row)}})
    return results


def pair_of(row: dict[str, Any]) -> tuple[str, str | None]:
    if "sentence1" in row:
        return row["sentence1"], row.get("sentence2")
    return str(prompt_of(row)), None


# --- command line ------------------------------------------------------------------------------


def reply_logprob(loaded, prompt: PromptInput, reply: str, recipe=None) -> float:
    """log p(reply | prompt), summed over the reply's tokens, as DPO-style training scores it: a chat
    prompt with the reply as the assistant turn (its end-of-turn token included), plain text otherwise."""
    import torch

    from lora_ns.inference_model import render_prompt

    tokenizer, model = loaded.tokenizer, loaded.model
    if isinstance(prompt, list) and tokenizer.chat_template:
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tokenize=True,
                                             return_dict=False)
    else:
        rendered = render_prompt(tokenizer, prompt, recipe)
        head = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"]
        full = head + tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([full], device=next(model.parameters()).device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
    return float(picked[len(head) - 1:].sum())
