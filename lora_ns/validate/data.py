"""Dataset checks for `validate`: read the first `SAMPLE_ROWS` rows of the training data (and of a
validation file) and report what would break or waste a run: errors at file:line, blank fields as
warnings, class and label counts; what the tokenizer makes of the rows is `lora_ns.validate.tokens`. Local
data up to `EVERY_ROW_BYTES` has the rest of its rows read and formatted too, as training will.
"""

from __future__ import annotations

import os
from collections import Counter
from itertools import islice
from typing import Any

from lora_ns.config import Recipe
from lora_ns.data.formatters import FORMATTERS, RowError
from lora_ns.data.loading import RowConverter, converter, hold_out, label_id, strict_rows
from lora_ns.data.preference import PREFERENCE_KINDS
from lora_ns.data.render import TEMPLATE_EXAMPLE, render, template_problem
from lora_ns.data.sources import (
    HubSource, LocalSource, Location, Source, first_rows, located_rows, looks_local, source_for,
)
from lora_ns.errors import Problem, UserError
from lora_ns.model import packs
from lora_ns.rewards import REWARD_TRIAL_ROWS, reference_problems, reward_trial_problems
from lora_ns.validate.model import hub_reachable, reachable_tokenizer
from lora_ns.validate.tokens import token_stats

SAMPLE_ROWS = 200
EVERY_ROW_BYTES = 32 * 2**20  # formatting 32 MB of rows takes seconds; larger data: the sample only
MAX_ROW_ERRORS = 5


Sampled = tuple[Location, dict[str, Any], dict[str, Any]]  # where, the raw row, its canonical example


def check_dataset(recipe: Recipe, dry_run: bool = True) -> list[Problem]:
    """Errors, warnings and info lines from a sample of the recipe's data (see the module docstring);
    `dry_run`: validating, not training (what only the training machine may be able to do warns)."""
    cfg = recipe.dataset
    if cfg.formatter not in FORMATTERS:
        return []  # lora_ns.validate.rules reports it
    problems: list[Problem] = []
    if cfg.prompt_template is not None and (why := template_problem(cfg.prompt_template)):
        problems.append(recipe.problem("dataset.prompt_template", why, TEMPLATE_EXAMPLE))
    elif (cfg.prompt_template or "").endswith((" ", "\t")):  # "A: " + "On Tuesday": the space joins "ĠOn"
        problems.append(recipe.problem(
            "dataset.prompt_template", "ends with a space, which the tokenizer joins to the answer's first "
            "word: training cuts the prompt there, and inference asks with a space the model never saw",
            "end it with a newline instead (e.g. 'Answer:\\n'), which is a token of its own",
            "warning"))
    splits: list[tuple[str | None, str]] = [(None, "dataset.path")]
    if isinstance(cfg.val_split, str) and (looks_local(cfg.val_split) or looks_local(cfg.path)):
        splits.append((cfg.val_split, "dataset.val_split"))
    examples: list[Sampled] = []
    found: dict[str, str] = {}
    for split, field in splits:
        try:
            src = source_for(cfg, split, field)
            sampled = _sample(src)
            if split is None and sampled and cfg.max_samples:  # training reads no further
                sampled = sampled[:cfg.max_samples]
        except UserError as err:
            return problems + err.problems
        if sampled is None:
            return problems + [recipe.problem(
                "dataset.path", f"dataset '{cfg.path}' not reachable, data checks skipped",
                "run validate where the Hub (or its cache) is available", "warning")]
        formatted, conv, errors = _format(recipe, src, sampled)
        problems += errors or _past_the_sample(recipe, src, len(sampled), conv)
        if split is None:
            examples, found = formatted, conv.columns if conv else {}
            problems += held_out_problems(recipe, len(sampled))
            if conv is not None and conv.paired is not None:  # seq_cls: the validation rows are of this kind
                recipe = recipe.model_copy(update={"dataset": cfg.model_copy(update={"pairs": conv.paired})})
    if any(p.is_error for p in problems) or not examples:
        return problems
    if recipe.task == "grpo":
        problems += reference_problems(recipe, [example.get("answer") for _, _, example in examples])
        tokenizer = reachable_tokenizer(recipe)[0]  # chat prompts as training renders them
        rows = [render(example, recipe, tokenizer) for _, _, example in examples[:REWARD_TRIAL_ROWS]]
        problems += reward_trial_problems(recipe, rows, dry_run)
    if recipe.task == "seq_cls":
        problems += _label_counts(recipe, examples)
    if recipe.task == "kto":
        problems += _kto_balance(recipe, examples)
    return problems + _empty_warnings(recipe, examples, found) + token_stats(recipe, examples)


def held_out_problems(recipe: Recipe, sampled: int) -> list[Problem]:
    """Training rows known whole (the sample read them all, or max_samples caps them): a fraction val_split
    is split as training will, so a split leaving either side empty fails now, and rows that fill no batch
    with ``dataloader_drop_last`` (a run of no step) fail too."""
    if not (sampled < SAMPLE_ROWS or sampled == recipe.dataset.max_samples):
        return []
    if isinstance(recipe.dataset.val_split, float):
        import datasets

        try:
            sampled = len(hold_out(datasets.Dataset.from_dict({"row": list(range(sampled))}), recipe)[0])
        except UserError as err:
            return err.problems
    batch = int(recipe.training.get("per_device_train_batch_size", 8))
    # one row a training example: packing and pretrain's blocks make more, GRPO repeats each prompt
    one_to_one = not packs(recipe) and recipe.task not in ("pretrain", "grpo")
    if recipe.training.get("dataloader_drop_last") and one_to_one and sampled < batch:
        return [recipe.problem("training.per_device_train_batch_size", f"{sampled} training rows fill no "
                               f"batch of {batch} with dataloader_drop_last: the run would train no step",
                               "add rows, lower it, or set training.dataloader_drop_last: false")]
    return []


def _sample(src: Source) -> list[tuple[Location, dict[str, Any]]] | None:
    """The first rows with their locations; None when a Hub dataset cannot be reached."""
    if not isinstance(src, HubSource):
        first_rows(src)  # an empty file is an error, wherever it is in the glob
        return list(islice(located_rows(src), SAMPLE_ROWS))
    if not hub_reachable():  # fail in seconds, not after huggingface_hub's ~25 s of retries
        return None
    try:
        import datasets

        stream = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                       streaming=True)
        return [(Location(src.path, None, i + 1), row) for i, row in enumerate(stream.take(SAMPLE_ROWS))]
    except Exception:  # offline, unknown id, gated: all mean "cannot check here"
        return None


def _format(recipe: Recipe, src: Source, sampled: list[tuple[Location, dict[str, Any]]],
            conv: RowConverter | None = None) -> tuple[list[Sampled], RowConverter | None, list[Problem]]:
    """The sampled rows with their canonical examples, the row converter (the sample's, or `conv`: one for
    a split, as training maps it), and the problems (missing columns, rows the formatter rejects: the first
    `MAX_ROW_ERRORS` of them)."""
    try:
        conv = conv or converter(list(dict.fromkeys(k for _, row in sampled for k in row)), src, recipe)
    except UserError as err:
        return [], None, err.problems
    # preference prompts are rendered next in training: a multi-turn one through a prompt_template fails there
    tokenizer = reachable_tokenizer(recipe)[0] if conv.fmt.kind in PREFERENCE_KINDS else None
    examples, bad = [], []
    for where, row in sampled:
        try:
            example = conv.canonical(row)
            if tokenizer is not None:
                render(example, recipe, tokenizer)
            examples.append((where, row, example))
        except RowError as err:
            bad.append(conv.problem(err, where))
    if len(bad) > MAX_ROW_ERRORS:
        more = len(bad) - MAX_ROW_ERRORS
        bad = bad[:MAX_ROW_ERRORS] + [Problem(bad[0].file, bad[0].field,
                                              f"... and {more} more rows like these")]
    return examples, conv, bad


def _past_the_sample(recipe: Recipe, src: Source, sampled: int, conv: RowConverter) -> list[Problem]:
    """Small local data read whole, in one pass, strictly (`strict_rows`: malformed rows, a file with columns
    the first lacks), and its rows after the sample up to max_samples formatted: a bad row there would
    otherwise stop training once the weights have loaded. Rows past max_samples are read, not formatted:
    the loader reads them, training does not use them."""
    if not isinstance(src, LocalSource) or sum(os.path.getsize(f) for f in src.files) > EVERY_ROW_BYTES:
        return []
    cap = recipe.dataset.max_samples
    try:
        rows = islice(strict_rows(src), sampled, None)
        used = islice(rows, None if cap is None else max(cap - sampled, 0))
        while chunk := list(islice(used, 10_000)):
            if errors := _format(recipe, src, chunk, conv)[2]:
                return errors
        for _ in rows:
            pass
    except UserError as err:
        return err.problems
    return []


def _empty_warnings(recipe: Recipe, examples: list[Sampled], columns: dict[str, str]) -> list[Problem]:
    """Blank required text fields (an empty question or answer trains nothing useful), by column."""
    fmt = FORMATTERS[recipe.dataset.formatter]
    blanks: dict[str, list[Location]] = {}
    for where, row, example in examples:
        for name in fmt.fields:
            value = row.get(columns[name])
            if isinstance(value, str) and not value.strip():
                blanks.setdefault(columns[name], []).append(where)
        if fmt.kind == "messages" and any(not m["content"].strip() for m in example["messages"]):
            blanks.setdefault(columns[fmt.fields[0]], []).append(where)
    problems = []
    for column, rows in blanks.items():
        first, n = rows[0], len(examples)
        if fmt.kind == "text":
            problems.append(Problem(first.file, column, f"{len(rows)} of {n} sampled rows are blank (first: "
                                    f"{first.where}); blank rows are skipped", "", first.line, "info"))
        else:
            what = "a message with no content" if fmt.kind == "messages" else f"an empty '{column}'"
            problems.append(Problem(first.file, column, f"{len(rows)} of {n} sampled rows have {what} "
                                    f"(first: {first.where})", "fill them in or drop those rows", first.line,
                                    "warning"))
    return problems


def _label_counts(recipe: Recipe, examples: list[Sampled]) -> list[Problem]:
    """The classes among the sampled rows; one class only is a warning (a label column mapped wrong, or a
    file sorted by label: training shuffles, but a one-class data set teaches the classifier one answer)."""
    names, where = recipe.model.labels or [], examples[0][0]
    counts = Counter(label_id(e["label"], names, recipe.model.num_labels) for _, _, e in examples)
    shown = ", ".join(f"{names[k] if k < len(names) else k}: {n}" for k, n in sorted(counts.items()))
    if len(counts) > 1:
        return [Problem(where.file, "label", f"classes in {len(examples)} sampled rows: {shown}", "",
                        severity="info")]
    whole = len(examples) < SAMPLE_ROWS or len(examples) == recipe.dataset.max_samples
    rows = f"all {len(examples)} rows" if whole else f"all {len(examples)} sampled rows (first {SAMPLE_ROWS})"
    return [Problem(where.file, "label", f"{rows} have one class ({shown})", "check the label column "
                    "(dataset.columns.label)" + ("" if whole else ", or shuffle a file sorted by label"),
                    where.line, "warning")]


def _kto_balance(recipe: Recipe, examples: list[Sampled]) -> list[Problem]:
    """KTO's desirable and undesirable rows in the sample. One kind only trains in one direction (a label
    column mapped wrong); weights that do not offset an imbalance are outside the range TRL's trainer
    recommends (Eq. 8 of the KTO paper: desirable x weight / undesirable x weight in [1, 1.33]), which TRL
    only logs once training has started."""
    where, t = examples[0][0], recipe.training
    w_good, w_bad = t.get("desirable_weight", 1.0), t.get("undesirable_weight", 1.0)
    good = sum(bool(e["label"]) for _, _, e in examples)
    bad = len(examples) - good
    counts = f"desirable: {good}, undesirable: {bad} of {len(examples)} sampled rows"
    if not good or not bad:
        return [Problem(where.file, "label", f"{counts}: KTO learns from both kinds, with one it only "
                        f"{'raises' if good else 'lowers'} each completion's likelihood",
                        "check the label column (dataset.columns.label: true = desirable)",
                        where.line, "warning")]
    if 1 <= good * w_good / (bad * w_bad) <= 1.33 or good == bad:
        return [Problem(where.file, "label", counts, "", severity="info")]
    low = bad * w_bad / good
    return [recipe.problem("training.desirable_weight", f"{counts}: the weights leave them unbalanced",
                           f"set training.desirable_weight in [{low:.2f}, {1.33 * low:.2f}] (TRL's range)",
                           "warning")]
