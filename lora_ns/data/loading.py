"""Load raw rows (Hub, local files, bundled samples), format them, and render them for the trainers.

- `load_raw(cfg, split)`: the raw rows as a `datasets.Dataset` (an `IterableDataset` when
  ``dataset.streaming``). Local files go through the HF builders (JSON lines / JSON list, CSV, TSV
  without quoting, Parquet, text), after `sources.precheck` has turned an empty file or a malformed
  row into a one-line error; a row the HF loader still rejects is located and reported as file:line.
- `build_datasets(recipe, tokenizer)`: (train, eval or None) rendered for TRL's SFTTrainer (or, for
  pairs, ready for `encode_pairs`). Every row goes through its formatter; a row it cannot use is an
  error naming file, line and column, never a silent drop. (Blank rows of a *text* dataset, e.g.
  the empty lines between paragraphs of a .txt file, are not examples and are skipped.)
- `formatted_examples(recipe, split, limit)`: the canonical, *un-rendered* examples plus their row's
  other columns, for evaluation; with ``split=recipe.dataset.val_split`` exactly the rows
  `build_datasets` evaluates on.

Validation data: ``dataset.val_split`` is a fraction held out of the training rows (the same rows
every time, from ``dataset.seed``), a split name (Hub datasets, or a local folder holding
``train.*``/``validation.*`` files), or a path to a file/glob of its own. ``max_samples`` caps the
training rows, before any fraction is held out.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator

from lora_ns.config import DatasetConfig, Recipe
from lora_ns.data.formatters import FORMATTERS, Formatter, RowError
from lora_ns.data.render import TEMPLATE_EXAMPLE, render, require_chat_template, template_problem
from lora_ns.data.sources import (
    EXTENSIONS, SAMPLE_PREFIX, LocalSource, Location, data_error, find_bad_row, header, iter_rows,
    local_source, locate, looks_local, precheck, resolve_sample,
)
from lora_ns.errors import Problem, UserError

resolve_data_path = resolve_sample  # older name, kept for callers


@dataclass(frozen=True)
class HubSource:
    path: str
    name: str | None
    split: str
    revision: str | None


Source = LocalSource | HubSource


def _first_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    text = str(cause).strip() or type(cause).__name__
    return text.splitlines()[0][:300]


def is_data_path(value: str) -> bool:
    """A ``val_split`` that names files rather than a split."""
    return value.startswith(SAMPLE_PREFIX) or any(c in value for c in "/\\*?") or \
        any(value.lower().endswith(ext) or value.lower().endswith(ext + ".gz") for ext in EXTENSIONS)


def source_for(cfg: DatasetConfig, split: str | None = None, field: str = "dataset.path") -> Source:
    """Where one split's rows come from; `split` None means the training split (``cfg.split``)."""
    if split is not None and is_data_path(split):
        return local_source(split, None, cfg.data_format, field)
    if looks_local(cfg.path):
        wanted = split if split is not None else (None if cfg.split == "train" else cfg.split)
        return local_source(cfg.path, wanted, cfg.data_format, field)
    return HubSource(cfg.path, cfg.name, split or cfg.split, cfg.revision)


def _load_local(src: LocalSource, streaming: bool):
    import datasets

    precheck(src, full=not streaming)
    kwargs = src.builder_kwargs(header(src) if src.builder == "csv" else [])
    try:
        return datasets.load_dataset(src.builder, data_files=list(src.files), split="train", streaming=streaming,
                                     **kwargs)
    except UserError:
        raise
    except Exception as err:
        find_bad_row(src)  # raises the precise file:line error when a row is malformed
        raise data_error(src.name, f"could not load: {_first_line(err)}", "check the format (dataset.data_format)",
                         field="dataset.path")


def _load_hub(src: HubSource, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision, streaming=streaming)
    except Exception as err:
        raise data_error(src.path, f"cannot load from the Hub: {_first_line(err)}",
                         "check the id, dataset.name and the split; offline, it must be in the HF cache",
                         field="dataset.path")


def load(cfg: DatasetConfig, split: str | None = None, field: str = "dataset.path"):
    """(raw rows, their source) for one split."""
    src = source_for(cfg, split, field)
    if isinstance(src, LocalSource):
        return _load_local(src, cfg.streaming), src
    return _load_hub(src, cfg.streaming), src


def load_raw(cfg: DatasetConfig, split: str | None = None):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) of raw rows of `split` (default: training)."""
    return load(cfg, split)[0]


# --- formatting rows --------------------------------------------------------------------------------

def get_columns(dataset) -> list[str]:
    """Column names; an `IterableDataset` may not know them (`column_names` is None), so peek at a row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first else []


def first_location(src: Source) -> Location:
    if isinstance(src, HubSource):
        return Location(src.path, None, 1)
    if src.builder == "csv":
        return Location(src.files[0], 1, 0)  # the header line
    return next(iter(iter_rows(src, limit_per_file=1)))[0]


def column_map(fmt: Formatter, mapping: dict[str, str], columns: list[str], where: Location) -> \
        tuple[dict[str, str], list[Problem]]:
    """formatter field -> column: ``dataset.columns`` first, then the field's own name, then its aliases."""
    problems = []
    for key in sorted(set(mapping) - set(fmt.all_fields)):
        problems.append(Problem(where.file, f"dataset.columns.{key}", f"formatter '{fmt.name}' has no field '{key}'",
                                f"its fields: {', '.join(fmt.all_fields)}"))
    found: dict[str, str] = {}
    missing: list[str] = []
    have = ", ".join(columns) or "none"
    for name in fmt.all_fields:
        if name in mapping:
            if mapping[name] in columns:
                found[name] = mapping[name]
            else:
                problems.append(Problem(where.file, f"dataset.columns.{name}",
                                        f"column '{mapping[name]}' not found (columns: {have})",
                                        "map the field to one of those columns", where.line))
            continue
        column = next((c for c in (name, *fmt.aliases.get(name, ())) if c in columns), None)
        if column is not None:
            found[name] = column
        elif name in fmt.fields:
            missing.append(name)
    if missing:  # one line for all of them: they are one mistake (wrong formatter, mapping or data_format)
        fix = misread_hint(columns) or \
            f"map it: dataset.columns: {{{missing[0]}: <column>}}, or pick another formatter"
        what = "column missing" if len(missing) == 1 else "columns missing"
        problems.append(Problem(where.file, ", ".join(missing), f"{what} (columns: {have})", fix, where.line))
    return found, problems


def misread_hint(columns: list[str]) -> str | None:
    """Column names that show the file was read in the wrong format (e.g. data_format: csv on JSON lines)."""
    if any(c.lstrip().startswith(("{", "[", '"')) for c in columns):
        return "the file looks like JSON lines read as CSV: set dataset.data_format: json"
    if len(columns) == 1 and "\t" in columns[0]:
        return "the file looks tab-separated: set dataset.data_format: tsv"
    if len(columns) == 1 and "," in columns[0]:
        return "the file looks comma-separated: set dataset.data_format: csv"
    return None


class RowConverter:
    """raw row -> canonical example (-> rendered row); a `RowError` becomes a `UserError` at the row's file:line."""

    def __init__(self, fmt: Formatter, columns: dict[str, str], src: Source, recipe: Recipe, tokenizer=None):
        self.fmt, self.columns, self.src, self.recipe, self.tokenizer = fmt, columns, src, recipe, tokenizer
        m = recipe.model
        self.check_labels = recipe.task == "seq_cls" and fmt.kind == "pair"
        self.label_names, self.num_labels = m.labels, m.num_labels

    def canonical(self, row: dict[str, Any]) -> dict[str, Any]:
        example = self.fmt({name: row.get(column) for name, column in self.columns.items()})
        if self.check_labels:
            from lora_ns.data.classification import label_id

            label_id(example["label"], self.label_names, self.num_labels)
        return example

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        used = set(self.columns.values())
        return {k: v for k, v in row.items() if k not in used}

    def problem(self, index: int, err: RowError) -> Problem:
        if isinstance(self.src, LocalSource):
            where = locate(self.src, index)
        else:
            where = Location(self.src.path, None, index + 1)
        message = err.message if where.line else f"row {where.row}: {err.message}"
        return Problem(where.file, self.columns.get(err.field, err.field), message, err.fix, where.line)

    def located(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return self.canonical(row)
        except RowError as err:
            raise UserError(self.problem(index, err)) from None

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        return render(self.located(row, index), self.recipe, self.tokenizer)


def formatter_for(recipe: Recipe) -> Formatter:
    name = recipe.dataset.formatter
    if name not in FORMATTERS:
        raise UserError(recipe.problem("dataset.formatter", f"unknown formatter '{name}'",
                                       f"use one of: {', '.join(sorted(FORMATTERS))}"))
    return FORMATTERS[name]


def converter(raw, src: Source, recipe: Recipe, tokenizer=None) -> tuple[RowConverter, list[str]]:
    """The row converter for a loaded split, after checking its columns against the formatter."""
    fmt = formatter_for(recipe)
    columns = get_columns(raw)
    found, problems = column_map(fmt, recipe.dataset.columns, columns, first_location(src))
    if problems:
        raise UserError(problems)
    return RowConverter(fmt, found, src, recipe, tokenizer), columns


def _convert(raw, src: Source, recipe: Recipe, tokenizer):
    import datasets

    conv, columns = converter(raw, src, recipe, tokenizer)
    if isinstance(raw, datasets.Dataset):
        return raw.map(conv, with_indices=True, remove_columns=columns, desc="Formatting rows")
    return raw.map(conv, with_indices=True, remove_columns=columns)


def _limit(raw, max_samples: int | None):
    import datasets

    if not max_samples:
        return raw
    if isinstance(raw, datasets.Dataset):
        return raw.select(range(min(max_samples, len(raw))))
    return raw.take(max_samples)


def held_out(index: int, fraction: float, seed: int) -> bool:
    """Streaming hold-out: a row is validation data when its (seed, index) hash falls under `fraction`."""
    return zlib.crc32(f"{seed}:{index}".encode()) < fraction * 2 ** 32


def _split_indices(n: int, recipe: Recipe) -> dict[str, list[int]]:
    """The train/test row indices `Dataset.train_test_split` picks for `n` rows (it depends on n and the seed only)."""
    import datasets

    cfg = recipe.dataset
    try:
        parts = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=cfg.val_split,
                                                                                  seed=cfg.seed)
    except ValueError as err:
        raise UserError(recipe.problem("dataset.val_split", f"cannot hold out {cfg.val_split} of {n} rows: "
                                       f"{_first_line(err)}", "use a larger fraction, or more data"))
    return {"train": parts["train"]["i"], "test": parts["test"]["i"]}


def _hold_out(data, recipe: Recipe):
    """(train, eval) with ``val_split`` as a fraction."""
    import datasets

    fraction, seed = recipe.dataset.val_split, recipe.dataset.seed
    if isinstance(data, datasets.Dataset):
        parts = _split_indices(len(data), recipe)
        return data.select(parts["train"]), data.select(parts["test"])
    return (data.filter(lambda _, i: not held_out(i, fraction, seed), with_indices=True),
            data.filter(lambda _, i: held_out(i, fraction, seed), with_indices=True))


def _drop_blank_text(data):
    return data.filter(lambda row: bool(row["text"].strip())) if data is not None else None


def check_template(recipe: Recipe) -> None:
    template = recipe.dataset.prompt_template
    why = template_problem(template) if template is not None else None
    if why:
        raise UserError(recipe.problem("dataset.prompt_template", why, TEMPLATE_EXAMPLE))


def build_datasets(recipe: Recipe, tokenizer=None):
    """(train, eval or None): formatted and rendered rows for SFTTrainer (pairs: for `encode_pairs`)."""
    cfg = recipe.dataset
    fmt = formatter_for(recipe)
    check_template(recipe)
    if fmt.kind == "messages" and tokenizer is not None:
        require_chat_template(recipe, tokenizer)
    raw, src = load(cfg)
    train = _convert(_limit(raw, cfg.max_samples), src, recipe, tokenizer)
    evaluation = None
    if isinstance(cfg.val_split, float):
        train, evaluation = _hold_out(train, recipe)
    elif isinstance(cfg.val_split, str):
        eval_raw, eval_src = load(cfg, cfg.val_split, "dataset.val_split")
        evaluation = _convert(eval_raw, eval_src, recipe, tokenizer)
    if fmt.kind == "text":
        train, evaluation = _drop_blank_text(train), _drop_blank_text(evaluation)
    return train, evaluation


def formatted_examples(recipe: Recipe, split: str | float | None = None, limit: int | None = None) -> Iterator[dict]:
    """Canonical, un-rendered examples for evaluation, each with its raw row's other columns.

    `split`: None -> the training rows `build_datasets` trains on; ``recipe.dataset.val_split`` (a
    fraction, a split name or a file path) -> exactly the rows it evaluates on, in the same order;
    any other split name or path -> all its rows. Each item is the formatter's output
    (``prompt``/``completion``, ``messages``, ``text`` or ``sentence1``/``sentence2``/``label``, labels
    as written) plus ``metadata`` (the row's columns the formatter did not read, e.g. MetaMath's
    ``type``) and ``row`` (1-based position in the loaded split). Render a prompt the way training
    did with `lora_ns.data.render.prompt_text`.
    """
    import datasets

    cfg = recipe.dataset
    fraction = isinstance(cfg.val_split, float)
    if split is None or (fraction and split == cfg.val_split):
        raw, src = load(cfg)
        raw = _limit(raw, cfg.max_samples)
        part = ("test" if split is not None else "train") if fraction else None
    else:
        raw, src = load(cfg, str(split), "dataset.val_split")
        part = None
    conv, _ = converter(raw, src, recipe)
    if part and isinstance(raw, datasets.Dataset):
        indices = _split_indices(len(raw), recipe)[part]
        rows = zip(indices, raw.select(indices))
    else:
        rows = enumerate(raw)
    streamed_part = part if not isinstance(raw, datasets.Dataset) else None
    count = 0
    for index, row in rows:
        if streamed_part and held_out(index, cfg.val_split, cfg.seed) != (streamed_part == "test"):
            continue
        example = conv.located(row, index)
        if conv.fmt.kind == "text" and not example["text"].strip():
            continue
        yield {**example, "metadata": conv.metadata(row), "row": index + 1}
        count += 1
        if limit is not None and count >= limit:
            return
