"""One loader for a training output (adapter dir), a merged dir or a base model, and what runs on it.

An adapter dir's base is loaded the way training loaded it (its saved ``recipe.yaml``: dtype, 4-bit for
QLoRA, seq_cls labels), then ``PeftModel.from_pretrained`` applies the adapter (peft's AutoPeftModelFor*
loads only the base the adapter names: not ``--base``, nor a builtin whose cache folder is gone). Anything
else is ``from_pretrained`` in its saved dtype. Weights are only read from safetensors; remote code runs
only when the recipe trusts it. Prompts are rendered as training rendered them (`render.prompt_text`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from lora_ns.adapters import merge_blocker, prefix_generation_problem
from lora_ns.builtin_models import resolve_model_path
from lora_ns.checkpoints import ADAPTER_CONFIG, check_adapter, is_adapter_dir, saved_recipe_file
from lora_ns.config import Recipe, load_recipe
from lora_ns.data.render import prompt_text, render, split_last_reply, uses_chat_template
from lora_ns.errors import fail, first_line, program
from lora_ns.model import auto_model_class, head_loaded_next, model_kwargs, tokenizer_as_trained

MERGE_INFO = "merge_info.json"
PromptInput = str | list[dict[str, str]]


class Prompt(NamedTuple):
    text: str
    add_special_tokens: bool  # not for chat text: the template carries its own special tokens


@dataclass
class Loaded:
    model: Any  # in eval mode; .device is where inputs go
    tokenizer: Any
    task: str  # causal_lm | seq_cls | cpt
    kind: str  # adapter | merged | base
    recipe: Recipe | None = None
    base: str | None = None  # the base model an adapter was loaded on
    requantized_layers: int = 0  # to merge: the base's layers that went through the 4-bit round trip


def local_model_path(path: str, flag: str, fix: str) -> str:
    """`path` with ``~`` expanded (``--model=~/run`` reaches us unexpanded); a path shaped like a folder
    (``/``, ``.``, ``~``) that does not exist is an error, not a Hub id to try."""
    expanded = os.path.expanduser(path)
    if path.startswith((os.sep, ".", "~")) and not os.path.exists(expanded):
        raise fail(path, flag, "model folder not found", fix)
    return expanded


def adapter_base(folder: Path, config: dict[str, Any], base: str | None, recipe: Recipe | None) -> str:
    """`base`, else the base the adapter names; a builtin's cache folder that is gone is rebuilt from the
    recipe's ``builtin:`` name."""
    named = saved = config.get("base_model_name_or_path")
    if base:
        path = resolve_model_path(local_model_path(base, "--base", "check the path"))
        if saved and os.path.realpath(path) != os.path.realpath(saved):
            print(f"{program('lora_ns')}: warning: {folder} was trained on {saved}; loading it on --base "
                  f"{base} (fine if it is a copy of that model)", file=sys.stderr)
        return path
    if recipe is not None and (not named or os.path.isabs(named) and not Path(named).exists()):
        named = recipe.model.name_or_path
    if not named:
        raise fail(str(folder / ADAPTER_CONFIG), "base_model_name_or_path",
                   "the adapter does not name its base model", "pass --base MODEL")
    return resolve_model_path(named)


# --- loading ----------------------------------------------------------------------------------------

@contextmanager
def one_line_errors(path: str, flag: str) -> Iterator[None]:
    """What transformers raises for a model it cannot read (missing, only pickle weights, ...) as one line."""
    try:
        yield
    except (OSError, ValueError) as err:
        reason = first_line(err, 300)
        fix = "check the path or hub id (offline, only local folders and builtin: models load)"
        raise fail(path, flag, f"cannot load the model: {reason}", fix) from None


def from_pretrained(path: str, task: str, flag: str, **kwargs):
    # head_loaded_next: an adapter's saved seq_cls head replaces the newly initialized one next
    with one_line_errors(path, flag), head_loaded_next(task):
        return auto_model_class(task).from_pretrained(path, **kwargs)


def load_base(path: str, task: str, recipe: Recipe | None, merging: bool, requantize: bool
              ) -> tuple[Any, int]:
    """An adapter's base as training loaded it (`lora_ns.model.model_kwargs`). To merge, in fp32: a 4-bit base
    (when `requantize`) quantized as in training, then dequantized, so each delta adds to the weights training
    saw; else the original weights. Also how many layers went through that 4-bit round trip."""
    import torch

    kwargs = model_kwargs(recipe) if recipe is not None else {"use_safetensors": True, "dtype": "auto"}
    four_bit = merging and requantize and recipe is not None and recipe.quantization.load_in_4bit
    if merging and not four_bit:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("quantization_config", "device_map")}
        kwargs["dtype"] = torch.float32
    model = from_pretrained(path, task, "--base", **kwargs)
    if not four_bit:
        return model, 0
    rounded = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model = model.dequantize(dtype=torch.float32).float().cpu()
    model.is_loaded_in_4bit = False  # transformers leaves the flag set, and peft's IA3 merge refuses on it
    return model, rounded


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Add the tokenizer's eos (e.g. ChatML's <|im_end|> when trained with that template) to the eos ids the
    generation config stops on, so `generate` (ours, or transformers' on a merged model) stops there."""
    config, eos = getattr(model, "generation_config", None), tokenizer.eos_token_id
    if config is None or eos is None:
        return
    known = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    if eos not in known:
        config.eos_token_id = [e for e in (*known, eos) if e is not None]


def is_prompt_learning(model) -> bool:
    """Prompt/prefix tuning and p-tuning: virtual tokens in front of the input, no weights to fold in."""
    return hasattr(model, "active_peft_config") and model.active_peft_config.is_prompt_learning


def load(path: str, base: str | None = None, recipe: Recipe | None = None, *, merging: bool = False,
         requantize: bool = True) -> Loaded:
    """`path` (adapter dir, merged dir, folder, hub id or builtin:name) in eval mode, on the GPU if any, with
    the tokenizer saved with it. An adapter on fp32 weights is folded into them (same outputs, faster
    decoding; bf16/fp16/4-bit would round the deltas); `merging` (lora_ns.merge) keeps it apart, on the CPU,
    on the base `load_base` gives."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    path = local_model_path(path, "--model", "check the path (an output_dir?)")
    local, rounded = Path(path), 0
    if recipe is None and (saved := saved_recipe_file(local)):  # training and merge save it with the weights
        recipe = load_recipe(saved)
    trust = bool(recipe and recipe.model.trust_remote_code)
    with one_line_errors(path, "--model"):
        if is_adapter_dir(local):
            from peft import PeftModel

            config, kind = check_adapter(local), "adapter"
            task = recipe.task if recipe else {"SEQ_CLS": "seq_cls"}.get(config.get("task_type"), "causal_lm")
            base = adapter_base(local, config, base, recipe)
            model, rounded = load_base(base, task, recipe, merging, requantize)
            try:
                model = PeftModel.from_pretrained(model, str(local))
            except RuntimeError as err:  # torch's load_state_dict: a page of "size mismatch for ..." lines
                if "size mismatch" not in str(err):
                    raise
                raise fail(str(local), "--base", f"the adapter does not fit {base}: its shapes differ", "use "
                           f"the model it was trained on: {config.get('base_model_name_or_path')}") from None
            tokenizer_path = str(local) if (local / "tokenizer_config.json").is_file() else base
        else:
            tokenizer_path, base = resolve_model_path(path), None
            heads = AutoConfig.from_pretrained(tokenizer_path, trust_remote_code=trust).architectures or []
            seq_cls = any(name.endswith("ForSequenceClassification") for name in heads)
            task = recipe.task if recipe else "seq_cls" if seq_cls else "causal_lm"
            model = from_pretrained(tokenizer_path, task, "--model", use_safetensors=True, dtype="auto",
                                    trust_remote_code=trust)
            kind = "merged" if (local / MERGE_INFO).is_file() else "base"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust)
    quantized = getattr(model, "hf_quantizer", None) is not None
    mergeable = kind == "adapter" and not is_prompt_learning(model) and not merge_blocker(model)
    if mergeable and not (merging or quantized) and model.get_base_model().dtype == torch.float32:
        model = model.merge_and_unload()  # prompt/prefix tuning add tokens, not weights: nothing to fold
    tokenizer_as_trained(tokenizer, recipe, model, keep_template=True)
    stop_at_end_of_turn(model, tokenizer)
    if torch.cuda.is_available() and not (merging or quantized):
        model.to("cuda")
    return Loaded(model.eval(), tokenizer, task, kind, recipe, base, rounded)


# --- inputs -----------------------------------------------------------------------------------------

def prompt_and_reference(row: dict[str, Any]) -> tuple[PromptInput, str]:
    """What a row asks and the answer it holds: messages ending on an assistant turn split there (that turn
    is the reference, `render.split_last_reply`), other messages whole; else text and completion or answer."""
    if "messages" in row and "prompt" not in row:
        messages = list(row["messages"])
        if messages and messages[-1]["role"] == "assistant":
            return split_last_reply(messages)
        return messages, ""
    asked = row.get("prompt", row.get("text", row.get("sentence1", "")))
    return asked, row.get("completion") or row.get("answer") or ""


def pair_of(row: dict[str, Any], tab: bool = False) -> tuple[str, str | None]:
    """A row's text(s) for a classifier; `tab`: a prompt "first<TAB>second" is a pair (typed, .txt lines)."""
    if "sentence1" in row:
        return row["sentence1"], row.get("sentence2")
    text = str(prompt_and_reference(row)[0])
    first, _, second = text.partition("\t") if tab else (text, "", "")
    return first, second or None


def render_prompt(tokenizer, prompt: PromptInput, recipe: Recipe | None = None) -> Prompt:
    """A prompt (or messages ending on a user turn) as the text the model continues: with a recipe as
    training rendered it, else through the chat template when the tokenizer has one."""
    listed = isinstance(prompt, list)
    chat = listed or chat_rendered(tokenizer, recipe)
    if chat and not tokenizer.chat_template:
        raise fail("<prompt>", "messages", "the model's tokenizer has no chat template",
                   "give plain prompts, or set model.chat_template in the recipe")
    if recipe is not None and (chat or recipe.task != "cpt"):
        # prompt_text renders up to the last assistant turn: an empty one stands for the reply to come
        reply = {"role": "assistant", "content": ""}
        example = {"messages": [*prompt, reply]} if listed else {"prompt": prompt, "completion": ""}
        return Prompt(prompt_text(example, recipe, tokenizer), not chat)
    if not chat:
        return Prompt(prompt, True)
    messages = prompt if listed else [{"role": "user", "content": prompt}]
    return Prompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False)


def chat_rendered(tokenizer, recipe: Recipe | None) -> bool:
    """Whether a plain prompt goes out through the chat template: with a recipe as training rendered it (not
    for cpt, nor with a prompt_template), else whenever the tokenizer has one."""
    if recipe is None:
        return bool(tokenizer.chat_template)
    return recipe.task != "cpt" and uses_chat_template(recipe, tokenizer)


def is_chat(loaded) -> bool:
    """Whether prompts reach this model as chat messages, so a conversation can carry its earlier turns."""
    generative = loaded.task not in ("seq_cls", "cpt", "pretrain")
    return generative and chat_rendered(loaded.tokenizer, loaded.recipe)


# --- running the model ------------------------------------------------------------------------------

def generate(loaded, prompts: Sequence[PromptInput], *, recipe=None, max_new_tokens: int = 256,
             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 8,
             progress: bool = True, seed: int | None = None) -> list[str]:
    """Completions for `prompts` (rendered with `recipe`, default the model's own), in input order."""
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    prefix = getattr(getattr(loaded.model, "active_peft_config", None), "peft_type", None) == "PREFIX_TUNING"
    if prefix and (why := prefix_generation_problem()):  # silently the base model's answers otherwise
        where = loaded.recipe.source if loaded.recipe else "<model>"
        raise fail(where, "peft.method", f"cannot generate with a prefix-tuning adapter: {why}",
                   "evaluate it by loss (perplexity, preference margin), or train lora to generate")
    if seed is not None:
        set_seed(seed)
    tokenizer, recipe = loaded.tokenizer, recipe or loaded.recipe
    rendered = [render_prompt(tokenizer, p, recipe) for p in prompts]
    encoded = [tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in rendered]
    sample = not greedy and temperature > 0  # greedy: no sampling options (the model's own would warn)
    options = {"temperature": temperature, "top_p": top_p} if sample else dict.fromkeys(
        ["temperature", "top_p", "top_k"])
    options.update(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=tokenizer.pad_token_id)
    if is_prompt_learning(loaded.model):  # peft drops position_ids there: left padding shifts a short prompt
        batch_size = 1
        # and its cached steps give transformers 5 positions without the virtual tokens (~0.1 logit off on the
        # tiny model); uncached, every step is the forward pass training ran
        options["use_cache"] = False
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    outputs = [""] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress):
        batch = order[start:start + batch_size]
        ids = {"input_ids": [encoded[i] for i in batch]}
        inputs = tokenizer.pad(ids, padding_side="left", return_tensors="pt")  # new tokens follow each prompt
        with torch.no_grad():
            out = loaded.model.generate(**inputs.to(loaded.model.device), **options)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


def classify(loaded, pairs: Sequence[tuple[str, str | None]], *, batch_size: int = 16,
             progress: bool = True) -> list[dict[str, Any]]:
    """For each (text, second text or None): {"label", "label_id", "probabilities": {label name: p}}."""
    import torch
    from tqdm.auto import tqdm

    names = [str(loaded.model.config.id2label[i]) for i in range(loaded.model.config.num_labels)]
    limit = loaded.recipe.training.get("max_length") if loaded.recipe else None  # cut as in training
    results: list[dict[str, Any]] = [{}] * len(pairs)
    groups = [[i for i, pair in enumerate(pairs) if (pair[1] is None) == single] for single in (False, True)]
    batches = [group[k:k + batch_size] for group in groups for k in range(0, len(group), batch_size)]
    for batch in tqdm(batches, desc="classifying", disable=not progress):  # all pairs, or all single texts
        first, second = zip(*(pairs[i] for i in batch))
        enc = loaded.tokenizer(list(first), list(second) if None not in second else None, padding=True,
                               padding_side="right", truncation=True, max_length=limit, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(loaded.model(**enc.to(loaded.model.device)).logits.float(), dim=-1)
        for i, row in zip(batch, probs.tolist()):
            best = max(range(len(row)), key=row.__getitem__)
            results[i] = {"label": names[best], "label_id": best,
                          "probabilities": {name: round(p, 6) for name, p in zip(names, row)}}
    return results


def preference_ids(example: dict[str, Any], recipe: Recipe, tokenizer) -> tuple[int, list[list[int]]]:
    """(prompt tokens, [prompt + chosen ids, prompt + rejected ids]) as TRL's DPO tokenizes a row (KTO's one
    completion likewise): `lora_ns.evaluate.reply_logprobs` scores them; validate counts the prompts that
    fill max_length, which DPO and KTO drop."""
    from trl.data_utils import common_prefix_length

    row = render(example, recipe, tokenizer)
    replies = [k for k in ("chosen", "rejected", "completion") if k in row]
    if isinstance(row["prompt"], list):
        options = {"tokenize": True, "return_dict": False}
        head = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, **options)
        fulls = [tokenizer.apply_chat_template(row["prompt"] + row[k], **options) for k in replies]
    else:
        head = tokenizer(row["prompt"])["input_ids"]
        fulls = [tokenizer(row["prompt"] + row[k] + tokenizer.eos_token)["input_ids"] for k in replies]
    return min(common_prefix_length(head, full) for full in fulls), fulls
