"""``validate --show-sample N``: the first N training examples as train sees them: `build_datasets` rows
through TRL's own ``SFTTrainer._prepare_dataset`` (called on a stand-in holding what it reads, so no model;
validate's token-length stats count the same rows).
Loss tokens are shown [[in double brackets]] (green on a terminal), with the share of loss tokens.
"""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace
from typing import Any

from lora_ns.config import SFT_TASKS, Recipe
from lora_ns.data import build_datasets
from lora_ns.data.loading import progress_bars_off
from lora_ns.model import load_tokenizer
from lora_ns.setup import training_arguments
from lora_ns.validate.model import reachable_tokenizer

# SFTTrainer tasks whose rows come from the recipe's formatter (`build_datasets`): pretrain packs token blocks
FORMATTED_SFT_TASKS = tuple(task for task in SFT_TASKS if task != "pretrain")


def first_rows(recipe: Recipe, count: int) -> tuple[Any, Any]:
    """(the first `count` rows `build_datasets` gives training, the tokenizer): validate's, loaded once for
    its checks (`reachable_tokenizer`), else loaded here."""
    few = recipe.model_copy(deep=True)
    few.dataset.max_samples, few.dataset.val_split, few.dataset.streaming = count, None, False
    tokenizer = reachable_tokenizer(recipe)[0] or load_tokenizer(recipe)
    with progress_bars_off():  # a "Map" bar amid validate's report (GRPO's prompts)
        return build_datasets(few, tokenizer)[0], tokenizer


def training_rows(recipe: Recipe, count: int) -> list[dict]:
    """The first `count` training rows, as SFTTrainer builds them (see `prepared_rows`)."""
    rows, tokenizer = first_rows(recipe, count)
    return prepared_rows(training_arguments(recipe), rows, tokenizer)


def sampled_lengths(recipe: Recipe, count: int) -> list[int]:
    """Tokens of the first `count` rows as training sees them, for the memory estimate's batch length
    (`memory.batch_length`): SFT rows as SFTTrainer prepares them, GRPO's prompts; none for other tasks."""
    if recipe.task in FORMATTED_SFT_TASKS:
        return [len(row["input_ids"]) for row in training_rows(recipe, count)]
    return prompt_lengths(recipe, count) if recipe.task == "grpo" else []


def prompt_lengths(recipe: Recipe, count: int) -> list[int]:
    """Tokens of the first `count` GRPO prompts as its trainer renders them (chat template, generation
    prompt; not truncated): each row then grows by up to max_completion_length generated tokens."""
    from trl.data_utils import maybe_apply_chat_template

    rows, tokenizer = first_rows(recipe, count)
    texts = [maybe_apply_chat_template({"prompt": row["prompt"]}, tokenizer)["prompt"] for row in rows]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def prepared_rows(args, rows, tokenizer) -> list[dict]:
    """input_ids and labels (-100: no loss) of rendered rows (a `datasets.Dataset`) through TRL's own
    ``SFTTrainer._prepare_dataset`` with these SFTConfig `args`; iterated, so no progress bars."""
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    template = get_training_chat_template(tokenizer) if args.assistant_only_loss else None
    stand_in = SimpleNamespace(_tokenizer=tokenizer, chat_template=template,
                               completion_only_loss=args.completion_only_loss is not False)
    prepared = SFTTrainer._prepare_dataset(stand_in, rows.to_iterable_dataset(), tokenizer, args, False, None,
                                           "sample")
    return [{"input_ids": row["input_ids"], "labels": row["labels"], "tokenizer": tokenizer}
            for row in prepared]


def marked_text(row: dict, colour: bool) -> str:
    """The example's text with the loss-carrying runs of tokens marked."""
    start, end = ("\033[32m", "\033[0m") if colour else ("[[", "]]")
    runs = itertools.groupby(zip(row["input_ids"], row["labels"]), key=lambda pair: pair[1] != -100)
    texts = ((loss, row["tokenizer"].decode([token for token, _ in run])) for loss, run in runs)
    return "".join(f"{start}{text}{end}" if loss else text for loss, text in texts)


def show_sample(recipe: Recipe, count: int) -> list[str]:
    if recipe.task not in FORMATTED_SFT_TASKS:
        why = "trains on packed token blocks" if recipe.task in SFT_TASKS else "is not trained by SFTTrainer"
        return [f"--show-sample: task {recipe.task} {why}, not formatted rows; nothing to show"]
    colour = sys.stdout.isatty()
    lines = []
    for i, row in enumerate(training_rows(recipe, count), 1):
        loss = sum(label != -100 for label in row["labels"])
        lines.append(f"--- example {i}: {len(row['input_ids'])} tokens, {loss} with loss "
                     f"({100 * loss / max(len(row['input_ids']), 1):.0f}%); loss tokens "
                     f"{'in green' if colour else 'in [[ ]]'}")
        lines.append(marked_text(row, colour))
    return lines
