"""Load raw rows, format them, and render them for the trainers.

A row a builder or a formatter rejects is reported as file:line, never dropped; only the blank rows of a
*text* dataset (the empty lines between paragraphs) are skipped. ``max_samples`` caps the training rows
before a fractional ``val_split`` is held out (the same rows every time, from ``dataset.seed``).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterator, Sequence

from lora_ns.config import DatasetConfig, Recipe
from lora_ns.data.formatters import FORMATTERS, Formatter, RowError, whole_number
from lora_ns.data.render import TEMPLATE_EXAMPLE, render, require_chat_template, template_problem
from lora_ns.data.sources import (
    BUILDERS, LocalSource, Location, Source, first_rows, locate, located_rows, source_for,
)
from lora_ns.errors import Problem, UserError, fail, first_line, suggest


@contextmanager
def progress_bars_off(off: bool = True) -> Iterator[None]:
    """The libraries' own bars hidden (`datasets`' "Generating train split" and "Map", transformers' "Loading
    weights", the Hub's downloads): amid our report they say nothing, and --no-progress means none. `off`
    false: as they are (a command's --no-progress not given)."""
    if not off:
        yield
        return
    import datasets
    from transformers.utils import logging as hf_logging

    shown = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            datasets.enable_progress_bars()
        if shown[1]:
            hf_logging.enable_progress_bar()


def _delimited(src: LocalSource, streaming: bool):
    """CSV/TSV rows read once, by our strict reader; the files' sizes and times key `datasets`' cache."""
    import datasets

    def generate() -> Iterator[dict[str, Any]]:
        return (row for _, row in located_rows(src))

    if streaming:
        return datasets.IterableDataset.from_generator(generate)
    stats = repr([(os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in src.files])
    return datasets.Dataset.from_generator(generate, fingerprint=hashlib.sha256(stats.encode()).hexdigest())


def strict_rows(src: LocalSource) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Every row of a local split by our strict reader: a malformed row raises its file:line `UserError`, and
    so does a column the first file does not have (`datasets` takes the columns from the first file and
    fails to cast a later one)."""
    first: set[str] = set()
    for where, row in located_rows(src):
        if where.file == src.files[0]:
            first.update(row)
        elif extra := sorted(set(row) - first):
            raise fail(where.file, "", f"column '{extra[0]}' is not in {src.files[0]}: datasets reads the "
                       "files as one table with the first file's columns", "give every file the same "
                       f"columns (or drop '{extra[0]}')", where.line)
        yield where, row


def read_every_row(src: Source) -> None:
    """`strict_rows` to the end: the error path after `datasets`' own reader failed, at load or, streaming,
    mid-training."""
    for _ in strict_rows(src) if isinstance(src, LocalSource) else ():
        pass


def _load_local(src: LocalSource, streaming: bool):
    import datasets

    if streaming or not src.delimited:  # (a CSV/TSV load reads every row through `located_rows`)
        first_rows(src)  # an empty file, or a bad first row, fails before the builder runs
    builder = BUILDERS.get(src.formats[0])
    # not "utf-8": only then does the JSON builder decode strictly (pyarrow keeps a bad byte); text: the BOM
    options = {} if builder == "parquet" else {"encoding": "utf-8-sig"}
    try:
        data = _delimited(src, streaming) if src.delimited else datasets.load_dataset(
            builder, data_files=list(src.files), split="train", streaming=streaming, **options)
        if streaming:
            next(iter(data), None)  # parse the first block now, so its malformed row is reported here
    except Exception as err:
        read_every_row(src)
        why = first_line(err.__cause__ or err, 300)
        raise fail(src.name, "dataset.path", f"could not load: {why}",
                   "check the format (dataset.data_format)")
    return data


def load(cfg: DatasetConfig, split: str | None = None, field: str = "dataset.path"):
    """(raw rows, their source) for one split."""
    import datasets

    src = source_for(cfg, split, field)
    if isinstance(src, LocalSource):
        return _load_local(src, cfg.streaming), src
    try:
        return datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                     streaming=cfg.streaming), src
    except Exception as err:
        why = first_line(err.__cause__ or err, 300)
        raise fail(src.path, "dataset.path", f"cannot load from the Hub: {why}",
                   "check the id, dataset.name and the split; offline, it must be in the HF cache")


# --- formatting rows --------------------------------------------------------------------------------

def column_map(fmt: Formatter, mapping: dict[str, str], columns: list[str], where: Location) -> \
        tuple[dict[str, str], list[Problem]]:
    """formatter field -> column: ``dataset.columns`` first, then the field's own name, then its aliases."""
    problems = [Problem(where.file, f"dataset.columns.{key}", f"formatter '{fmt.name}' has no field '{key}'",
                        suggest(key, fmt.all_fields, "its fields"))
                for key in sorted(set(mapping) - set(fmt.all_fields))]
    found: dict[str, str] = {}
    missing: list[str] = []
    have = ", ".join(columns) or "none"
    for name in fmt.all_fields:
        if name in mapping and mapping[name] not in columns:
            problems.append(Problem(where.file, f"dataset.columns.{name}",
                                    f"column '{mapping[name]}' not found (columns: {have})",
                                    "map the field to one of those columns", where.line))
            continue
        candidates = (mapping[name],) if name in mapping else (name, *fmt.aliases.get(name, ()))
        column = next((c for c in candidates if c in columns), None)
        if column is not None:
            found[name] = column
        elif name in fmt.fields:
            missing.append(name)
    if missing:  # one line for all of them: they are one mistake (wrong formatter, mapping or data_format)
        fix = f"map it (dataset.columns: {{{missing[0]}: <column>}}), pick another formatter, or, if the " \
            "columns look like a misread file, set dataset.data_format: csv, tsv or json"
        what = "column missing" if len(missing) == 1 else "columns missing"
        problems.append(Problem(where.file, ", ".join(missing), f"{what} (columns: {have})", fix, where.line))
    return found, problems


class RowConverter:
    """raw row -> canonical example (-> rendered row); a `RowError` becomes a `UserError` at its file:line."""

    def __init__(self, fmt: Formatter, columns: dict[str, str], src: Source, recipe: Recipe, tokenizer=None):
        self.fmt, self.columns, self.src, self.recipe, self.tokenizer = fmt, columns, src, recipe, tokenizer
        self.paired = recipe.dataset.pairs  # seq_cls: sentence pairs or single texts; None: as the first row

    def canonical(self, row: dict[str, Any]) -> dict[str, Any]:
        example = self.fmt({name: row.get(column) for name, column in self.columns.items()})
        if self.recipe.task == "seq_cls" and self.fmt.kind == "pair":
            label_id(example["label"], self.recipe.model.labels, self.recipe.model.num_labels)
            self.paired = same_kind(example, self.paired)
        return example

    def problem(self, err: RowError, where: Location) -> Problem:
        message = err.message if where.line else f"row {where.row}: {err.message}"
        return Problem(where.file, self.columns.get(err.field, err.field), message, err.fix, where.line)

    def __call__(self, row: dict[str, Any], index: int, rendered: bool = True) -> dict[str, Any]:
        try:
            example = self.canonical(row)
            return render(example, self.recipe, self.tokenizer) if rendered else example
        except RowError as err:
            raise UserError(self.problem(err, locate(self.src, index))) from None


def is_pair(example: dict[str, Any]) -> bool:
    return example.get("sentence2") is not None


def same_kind(example: dict[str, Any], paired: bool | None) -> bool:
    """Whether the rows are sentence pairs: `paired`, or this first row's kind; a row of the other kind is a
    `RowError` (a classifier trained on a mix answers one kind from what it learned of the other)."""
    if paired is not None and is_pair(example) != paired:
        raise RowError("sentence2", "missing in a sentence-pair dataset" if paired else "set in a dataset of "
                       "single texts (row 1 has none, or dataset.pairs: false)",
                       "give every row a sentence2, or none")
    return is_pair(example) if paired is None else paired


def columns_of(raw) -> list[str]:
    """Column names; an `IterableDataset` may not know them (`column_names` is None), so peek at a row."""
    return list(raw.column_names if raw.column_names is not None else next(iter(raw), None) or [])


def unknown_formatter(recipe: Recipe) -> Problem | None:
    """``dataset.formatter`` names no formatter: the closest name, or the list."""
    name = recipe.dataset.formatter
    if name in FORMATTERS:
        return None
    return recipe.problem("dataset.formatter", f"unknown formatter '{name}'",
                          suggest(name, sorted(FORMATTERS)))


def converter(columns: list[str], src: Source, recipe: Recipe, tokenizer=None) -> RowConverter:
    """The row converter for a split with these columns, after checking them against the formatter."""
    name = recipe.dataset.formatter
    if problem := unknown_formatter(recipe):
        raise UserError(problem)
    where = locate(src, 0)  # a column problem is reported at the first row, or at a CSV/TSV header
    where = where._replace(line=1) if isinstance(src, LocalSource) and src.delimited else where
    found, problems = column_map(FORMATTERS[name], recipe.dataset.columns, columns, where)
    if problems:
        raise UserError(problems)
    return RowConverter(FORMATTERS[name], found, src, recipe, tokenizer)


NEW = "__lora_ns__"  # `_convert`'s output columns, until renamed


def _convert(raw, src: Source, recipe: Recipe, tokenizer):
    """`raw` converted row by row. The output columns are written under new names, then renamed: `datasets`
    gives an output column the type of the input column of its name, and a column of mixed types (a number
    among texts) has the `Json` type, which decodes our text "42" back to the number 42. (A stream's rows
    are not retyped, and its columns are not known without reading a row.)"""
    import datasets

    columns = columns_of(raw)
    convert = converter(columns, src, recipe, tokenizer)
    if not isinstance(raw, datasets.Dataset):
        return raw.map(convert, with_indices=True, remove_columns=columns)
    converted = raw.map(lambda row, i: {NEW + k: v for k, v in convert(row, i).items()}, with_indices=True,
                        remove_columns=columns)
    return converted.rename_columns({c: c[len(NEW):] for c in converted.column_names})


def hold_out(data, recipe: Recipe):
    """(train, eval) for a fractional ``val_split``: `Dataset.train_test_split`, or a hash when streaming."""
    import datasets

    fraction, seed = recipe.dataset.val_split, recipe.dataset.seed
    if not isinstance(data, datasets.Dataset):  # streaming: no length, so hash each row's index
        def held(_: dict, i: int) -> bool:  # validation data when the (seed, i) hash is under `fraction`
            return zlib.crc32(f"{seed}:{i}".encode()) < fraction * 2 ** 32
        return (data.filter(lambda row, i: not held(row, i), with_indices=True),
                data.filter(held, with_indices=True))
    try:
        parts = data.train_test_split(test_size=fraction, seed=seed)
    except ValueError as err:
        why = first_line(err.__cause__ or err, 300)
        raise UserError(recipe.problem("dataset.val_split",
                                       f"cannot hold out {fraction} of {len(data)} rows: {why}",
                                       "add rows, use a fraction that leaves rows on both sides, or name a "
                                       "validation split"))
    return parts["train"], parts["test"]


def build_datasets(recipe: Recipe, tokenizer=None):
    """(train, eval or None): formatted and rendered rows for TRL's trainers (pairs: for `encode_pairs`)."""
    cfg = recipe.dataset
    if cfg.prompt_template is not None and (why := template_problem(cfg.prompt_template)):
        raise UserError(recipe.problem("dataset.prompt_template", why, TEMPLATE_EXAMPLE))
    kind = FORMATTERS[cfg.formatter].kind if cfg.formatter in FORMATTERS else None
    if kind == "messages" and tokenizer is not None:
        require_chat_template(recipe, tokenizer)
    raw, src = load(cfg)
    train = _convert(raw.take(cfg.max_samples) if cfg.max_samples else raw, src, recipe, tokenizer)
    evaluation = None
    if isinstance(cfg.val_split, float):
        train, evaluation = hold_out(train, recipe)
    elif isinstance(cfg.val_split, str):
        evaluation = _convert(*load(cfg, cfg.val_split, "dataset.val_split"), recipe, tokenizer)
    if kind == "text":
        train, evaluation = (None if d is None else d.filter(lambda row: bool(row["text"].strip()))
                             for d in (train, evaluation))
    return train, evaluation


def formatted_examples(recipe: Recipe, split: str | float | None = None,
                       limit: int | None = None) -> Iterator[dict]:
    """Canonical examples plus ``metadata`` (the columns the formatter did not read) and ``row`` (1-based).

    `split`: None -> the rows `build_datasets` trains on; ``dataset.val_split`` -> exactly those it
    evaluates on, in order; any other split name or path -> all its rows.
    """
    cfg = recipe.dataset
    own = split is None or (isinstance(cfg.val_split, float) and split == cfg.val_split)
    raw, src = load(cfg) if own else load(cfg, str(split), "dataset.val_split")
    raw = raw.take(cfg.max_samples) if own and cfg.max_samples else raw
    conv = converter(columns_of(raw), src, recipe)
    rows: Iterator[tuple[int, dict[str, Any]]] = enumerate(raw)
    if own and isinstance(cfg.val_split, float):  # the same hold-out as build_datasets, on numbered rows
        numbered = raw.map(lambda _, i: {"__row__": i}, with_indices=True)
        rows = ((row.pop("__row__"), row) for row in hold_out(numbered, recipe)[split is not None])
    read = set(conv.columns.values())
    examples = ({**conv(row, i, rendered=False), "metadata": {k: v for k, v in row.items() if k not in read},
                 "row": i + 1} for i, row in rows)
    yield from islice((e for e in examples if conv.fmt.kind != "text" or e["text"].strip()), limit)


# --- sequence classification ------------------------------------------------------------------------

def label_id(label: Any, label_names: Sequence[str] | None = None, num_labels: int | None = None) -> int:
    """A label (id, class name, or the text of an id) -> its id; `RowError` when it names no class."""
    names = list(label_names or [])
    count = len(names) or num_labels
    if isinstance(label, str) and label.strip() in names:
        return names.index(label.strip())
    if (number := whole_number(label)) is None:
        hint = "use a class id (0, 1, ...) or a class name"
        if isinstance(label, str):
            hint = suggest(label.strip(), names) if names else "list the class names in model.labels"
        raise RowError("label", f"unknown label {label!r}", hint)
    label = number
    if label < 0 or (count and label >= count):
        valid = f"0..{count - 1}" if count else "0 or more"
        raise RowError("label", f"label {label} is out of range ({valid})",
                       "fix the label or model.num_labels")
    return label


def encode_pairs(dataset, tokenizer, max_length: int | None, label_names: Sequence[str] | None,
                 source: str = "<dataset>", paired: bool | None = None):
    """Tokenize the pair formatters' rows and map labels to ids, for `Trainer` + `DataCollatorWithPadding`.
    `paired`: rows are sentence pairs (default: as the first row is); `source` names the data in errors."""
    columns = columns_of(dataset)
    paired = is_pair(next(iter(dataset), None) or {}) if paired is None else paired

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        labels = []
        seconds = batch.get("sentence2") or [None] * len(indices)
        for i, second, label in zip(indices, seconds, batch["label"]):
            try:
                labels.append(label_id(label, label_names))
                same_kind({"sentence2": second}, paired)
            except RowError as err:
                raise fail(source, err.field, f"row {i + 1}: {err.message}", err.fix) from None
        limit = max_length or tokenizer.model_max_length
        pairs = seconds if paired else None
        return {**tokenizer(batch["sentence1"], pairs, truncation=True, max_length=limit), "labels": labels}

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=columns)
