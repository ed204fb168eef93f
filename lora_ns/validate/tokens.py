"""What the tokenizer makes of `validate`'s data sample (`lora_ns.validate.data`): tokens per example as
training counts them, rows truncation or TRL would drop, the padding share of the batching, and chat-template
problems (no assistant markers for the loss mask; a template that refuses a conversation) at the row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_ns.config import Recipe
from lora_ns.data.formatters import FORMATTERS
from lora_ns.data.preference import PREFERENCE_KINDS
from lora_ns.data.render import render, require_chat_template, uses_chat_template
from lora_ns.errors import Problem, UserError
from lora_ns.model import context_length, eos_problem, tokenizer_field
from lora_ns.setup import training_arguments, training_value
from lora_ns.validate.model import load_config, reachable_tokenizer
from lora_ns.validate.sample import prepared_rows

if TYPE_CHECKING:
    from lora_ns.validate.data import Sampled


def token_stats(recipe: Recipe, examples: list[Sampled]) -> list[Problem]:
    """Tokens per example as train counts them (TRL's own SFT preparation, untruncated; pairs as encoded),
    and the padding share of the batching the real training arguments will use."""
    import datasets
    import numpy as np

    fmt, where = FORMATTERS[recipe.dataset.formatter], examples[0][0].file
    tokenizer, why = reachable_tokenizer(recipe)
    if tokenizer is not None and (refused := refused_conversation(recipe, tokenizer, examples)):
        return [refused]
    if recipe.task == "grpo" and tokenizer is not None:
        return _completion_room(recipe, tokenizer, examples)
    if fmt.kind in PREFERENCE_KINDS and recipe.task not in ("dpo", "kto") or recipe.task == "pretrain":
        return []  # not SFT rows and none dropped, or (pretrain) documents packed whole: none cut or padded
    if tokenizer is None:
        return [Problem(where, "dataset", f"token-length stats skipped: {why}", severity="info")]
    if (problem := eos_problem(recipe, tokenizer)) is not None:  # TRL's preparation would stop on it
        return [problem]
    if fmt.kind in PREFERENCE_KINDS:
        return _long_prompts(recipe, tokenizer, examples)
    args = None if recipe.task == "seq_cls" else training_arguments(recipe)
    if fmt.kind == "messages":
        try:
            require_chat_template(recipe, tokenizer)
        except UserError as err:
            return err.problems
        if args.assistant_only_loss and (problems := assistant_mask_problems(recipe, tokenizer)):
            return problems
    chat = fmt.kind == "messages" or fmt.kind == "prompt_completion" and uses_chat_template(recipe, tokenizer)
    if args is not None and args.assistant_only_loss and not chat:  # SFTTrainer refuses it as it starts
        return [recipe.problem("training.assistant_only_loss", "needs chat rows, and these go out as plain "
                               "text", "set assistant_only_loss: false (prompt/completion rows train on the "
                               "completion: completion_only_loss), or use the chat template")]
    rows = [render(example, recipe, tokenizer) for _, _, example in examples
            if fmt.kind != "text" or example["text"].strip()]
    if not rows:
        return []
    lost: Problem | None = None  # rows truncation leaves without a loss token
    if args is None:
        limit, limit_name = (tokenizer.model_max_length if tokenizer.model_max_length < 10 ** 7 else None,
                             "the tokenizer's model_max_length")
        if recipe.training.get("max_length"):
            limit, limit_name = recipe.training["max_length"], "training.max_length"
        seconds = [r.get("sentence2") for r in rows]
        pair = seconds if all(isinstance(s, str) for s in seconds) else None
        ids = tokenizer([r["sentence1"] for r in rows], pair)["input_ids"]
    else:
        limit, limit_name, args.max_length = args.max_length, "training.max_length", None  # the full lengths
        prepared = prepared_rows(args, datasets.Dataset.from_list(rows), tokenizer)
        ids = [row["input_ids"] for row in prepared]
    if (unknown := unknown_problem(recipe, tokenizer, ids)) is not None and unknown.is_error:
        return [unknown]
    lengths = [len(row) for row in ids]
    if args is not None and limit and not args.packing:
        lost = _truncated_away(recipe, args, limit, prepared)
        if lost is not None and lost.is_error:
            return [lost]
    style = "chat template" if chat else "plain text"
    over = f"; {sum(n > limit for n in lengths)} exceed {limit_name}={limit} and will be truncated" \
        if limit else ""
    p50, p95 = (int(np.percentile(lengths, q)) for q in (50, 95))
    notes = [p for p in (unknown, lost) if p is not None]
    notes += [Problem(where, "dataset", f"{len(lengths)} rows sampled ({style}): tokens per example "
                     f"p50 {p50}, p95 {p95}, max {max(lengths)}{over}", severity="info")]
    if args is not None and not args.packing and len(lengths) > 1:
        sizes, batch = [min(n, limit or n) for n in lengths], args.per_device_train_batch_size
        grouped = (getattr(args, "train_sampling_strategy", None) == "group_by_length"
                   or getattr(args, "group_by_length", False))  # its name before transformers 5.x
        padded = padding(sorted(sizes) if grouped else sizes, batch)
        share = padded / (padded + sum(sizes))
        how = "rows grouped by length" if grouped else "train_sampling_strategy: group_by_length cuts it"
        notes.append(Problem(where, "dataset", f"at batch size {batch}, {share:.0%} of computed tokens would "
                             f"be padding ({how})", severity="info"))
    return notes


def unknown_problem(recipe: Recipe, tokenizer, ids: list[list[int]]) -> Problem | None:
    """Many of the sampled rows' tokens the unknown token: the tokenizer cannot read this text (another
    language's, or none: transformers builds an empty one for a folder saved without its vocabulary file)."""
    total, unk = sum(map(len, ids)), tokenizer.unk_token_id
    share = sum(i == unk for row in ids for i in row) / total if unk is not None and total else 0
    if share < 0.05:  # a rare symbol or emoji a vocabulary lacks is normal
        return None
    return recipe.problem(tokenizer_field(recipe), f"{share:.0%} of the sampled rows' tokens are "
                          f"{tokenizer.unk_token} (unknown): the tokenizer ({len(tokenizer):,} tokens) "
                          "cannot read this text", "use the model's own tokenizer, saved with its vocabulary",
                          "error" if share >= 0.5 else "warning")


def refused_conversation(recipe: Recipe, tokenizer, examples: list[Sampled]) -> Problem | None:
    """The first sampled row whose conversation the chat template refuses (its raise_exception: Mistral's
    alternating roles, Gemma's "System role not supported"): TRL would stop on it with a traceback, while
    tokenizing (the rows from ``messages`` or prompt + reply) or, for GRPO's prompts, at the first step."""
    from jinja2 import TemplateError

    if not tokenizer.chat_template:
        return None
    for where, _, example in examples:
        row = render(example, recipe, tokenizer)
        turns = row.get("messages", row.get("prompt"))
        if not isinstance(turns, list):  # plain text: no template
            continue
        replies = [row[k] for k in ("completion", "chosen", "rejected") if isinstance(row.get(k), list)]
        for conversation in [turns + reply for reply in replies] or [turns]:
            try:
                tokenizer.apply_chat_template(conversation, tokenize=False)
            except TemplateError as err:
                fix = "or remove dataset.system_prompt" if recipe.dataset.system_prompt else "or fix the row"
                return Problem(where.file, "messages" if "messages" in row else "prompt", "the chat template "
                               f"refuses this conversation: {err}", f"set model.chat_template to one that "
                               f"takes it, {fix}", where.line)
    return None


def _completion_room(recipe: Recipe, tokenizer, examples: list[Sampled]) -> list[Problem]:
    """GRPO samples max_completion_length tokens after the whole prompt (TRL 1 cuts none): with the longest
    sampled prompt, past the model's positions, a completion reaches positions learned embeddings (GPT-2) have
    no row for, mid-generation, or a rotary model never trained on. (The completion alone: validate.model.)"""
    config, _ = load_config(recipe)
    context, completion = config and context_length(config), training_value(recipe, "max_completion_length")
    if not (context and completion):
        return []
    longest = 0
    for _, _, example in examples:
        prompt = render(example, recipe, tokenizer)["prompt"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) \
            if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        longest = max(longest, len(ids))
    if longest + completion <= context or completion >= context:
        return []
    return [recipe.problem("training.max_completion_length", f"the longest sampled prompt ({longest} tokens) "
                           f"and max_completion_length {completion} pass the model's {context} positions: a "
                           "completion that long runs past them (learned positions stop there, mid-run)",
                           f"set it to {context - longest} or less, or shorten the prompts", "warning")]


def _truncated_away(recipe: Recipe, args, limit: int, prepared: list[dict]) -> Problem | None:
    """SFT rows whose loss tokens all lie past max_length: TRL truncates, then drops them."""
    cut = slice(None, limit) if args.truncation_mode == "keep_start" else slice(-limit, None)
    lost = sum(all(label == -100 for label in row["labels"][cut]) for row in prepared)
    return _dropped(recipe, lost, len(prepared), f"keep no loss token within max_length={limit}",
                    "raise training.max_length (validate --show-sample shows the loss tokens)")


def _long_prompts(recipe: Recipe, tokenizer, examples: list[Sampled]) -> list[Problem]:
    """DPO and KTO drop a row whose prompt alone fills max_length (keep_start truncation, KTO's only one,
    would leave no reply)."""
    from lora_ns.inference import preference_ids

    args = training_arguments(recipe)
    if args.max_length is None or getattr(args, "truncation_mode", "keep_start") != "keep_start":
        return []
    lost = sum(preference_ids(example, recipe, tokenizer)[0] >= args.max_length for _, _, example in examples)
    problem = _dropped(recipe, lost, len(examples), f"have prompts that fill max_length={args.max_length}",
                       "raise training.max_length, or shorten the prompts")
    return [problem] if problem is not None else []


def _dropped(recipe: Recipe, lost: int, total: int, why: str, fix: str) -> Problem | None:
    """Sampled rows TRL will drop before training: every one, an error (training would start with no data
    and crash in the sampler); some, a warning (they are silently not trained on)."""
    if not lost:
        return None
    every = lost == total
    return recipe.problem("training.max_length", f"{lost} of {total} sampled rows {why}, and TRL drops such "
                          "rows" + (": nothing would be left to train on" if every else ""), fix,
                          "error" if every else "warning")


def padding(sizes: list[int], batch_size: int) -> int:
    """Pad tokens when consecutive batches of `batch_size` rows are each padded to their longest row."""
    return sum(len(chunk) * max(chunk) - sum(chunk)
               for chunk in (sizes[i:i + batch_size] for i in range(0, len(sizes), batch_size)))


def assistant_mask_problems(recipe: Recipe, tokenizer) -> list[Problem]:
    """assistant_only_loss needs {% generation %} markers; TRL swaps in a marked template for the families
    it knows and fails at train time for the others, so say it here, with the way through."""
    from trl.chat_template_utils import get_training_chat_template

    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        return [recipe.problem("model.chat_template", "the tokenizer's chat template cannot mark assistant "
                               "turns for training.assistant_only_loss (no {% generation %} markers, and TRL "
                               "has no patched version of it)", "set model.chat_template: chatml (for ChatML "
                               "models) or another training template, or "
                               "training.assistant_only_loss: false")]
    return []
