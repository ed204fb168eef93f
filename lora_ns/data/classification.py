"""Sequence classification rows: label names -> ids, and tokenized (sentence, sentence-pair) datasets.

`encode_pairs` turns ``{"sentence1", "sentence2", "label"}`` rows (what the pair formatters give)
into ``input_ids``/``attention_mask``/``labels`` for transformers' `Trainer` with
`DataCollatorWithPadding`. Labels may be ids or class names; names go through ``label_names``
(the recipe's ``model.labels``), and a label that is neither is an error naming the row.
"""

from __future__ import annotations

from typing import Any, Sequence

from lora_ns.data.formatters import RowError
from lora_ns.errors import Problem, UserError

PAIR_COLUMNS = ("sentence1", "sentence2", "label")


def label_id(label: Any, label_names: Sequence[str] | None = None, num_labels: int | None = None) -> int:
    """A label (id, class name, or digit string) -> its id; `RowError` when it names no class."""
    names = list(label_names or [])
    count = len(names) or num_labels
    if isinstance(label, str):
        text = label.strip()
        if text in names:
            return names.index(text)
        if text.lstrip("-").isdigit():
            label = int(text)
        else:
            hint = f"use one of: {', '.join(names)}" if names else "list the class names in model.labels"
            raise RowError("label", f"unknown label {label!r}", hint)
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise RowError("label", f"unknown label {label!r}", "use a class id (0, 1, ...) or a class name")
    if label < 0 or (count and label >= count):
        valid = f"0..{count - 1}" if count else "0 or more"
        raise RowError("label", f"label {label} is out of range ({valid})", "fix the label or model.num_labels")
    return label


def _first_row(dataset) -> dict[str, Any]:
    return next(iter(dataset), None) or {}


def encode_pairs(dataset, tokenizer, max_length: int | None, label_names: Sequence[str] | None,
                 source: str = "<dataset>"):
    """Tokenize sentence / sentence-pair rows and map labels to ids (``Dataset`` or ``IterableDataset``).

    Whether rows are pairs is decided by the first row's ``sentence2`` (None: single sentences); a
    later row that disagrees is an error. `source` names the data in error messages (e.g.
    ``recipe.dataset.path``); rows are numbered from 1 in the order of `dataset`.
    """
    first = _first_row(dataset)
    columns = list(dataset.column_names) if dataset.column_names is not None else list(first)
    missing = [c for c in ("sentence1", "label") if c not in columns]
    if missing:
        raise UserError(Problem(source, missing[0], f"column missing (have: {', '.join(columns) or 'none'})",
                                "build the dataset with a pair formatter (e.g. glue_mrpc)"))
    paired = first.get("sentence2") is not None
    limit = max_length or tokenizer.model_max_length

    def fail(field: str, i: int, message: str, fix: str = "") -> UserError:
        return UserError(Problem(source, field, f"row {i + 1}: {message}", fix))

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        labels = []
        seconds = batch.get("sentence2") or [None] * len(indices)
        for i, text, second, label in zip(indices, batch["sentence1"], seconds, batch["label"]):
            try:
                labels.append(label_id(label, label_names))
            except RowError as err:
                raise fail("label", i, err.message, err.fix)
            if not isinstance(text, str):
                raise fail("sentence1", i, "missing text", "fill it in or drop the row")
            if paired and not isinstance(second, str):
                raise fail("sentence2", i, "missing in a sentence-pair dataset", "fill it in or drop the row")
            if not paired and second is not None:
                raise fail("sentence2", i, "set here but not in row 1", "give every row a sentence2, or none")
        pair = seconds if paired else None
        return {**tokenizer(batch["sentence1"], pair, truncation=True, max_length=limit), "labels": labels}

    return dataset.map(encode, batched=True, with_indices=True, remove_columns=columns)
