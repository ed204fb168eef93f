"""Datasets: load raw rows (Hub or local files), format them with a named formatter, render them for TRL.

Public API (heavy libraries are imported only when these run):

- `build_datasets(recipe, tokenizer) -> (train, eval | None)`: what SFTTrainer / Trainer get.
- `load_raw(cfg, split=None)`: raw rows (`Dataset`, or `IterableDataset` when streaming).
- `formatted_examples(recipe, split=None, limit=None)`: canonical un-rendered examples + metadata,
  for evaluation (``split=recipe.dataset.val_split`` gives exactly the evaluation rows).
- `encode_pairs(dataset, tokenizer, max_length, label_names)`: tokenized seq_cls rows.
- `FORMATTERS` / `get_formatter(name)`; `render`, `prompt_text`, `sft_defaults` (lora_ns.data.render);
  `padding_stats` (lora_ns.data.stats); `check_dataset` (lora_ns.validate.data).
"""

from lora_ns.data.classification import encode_pairs, label_id
from lora_ns.data.formatters import FORMATTERS, Formatter, RowError, get_formatter
from lora_ns.data.loading import build_datasets, formatted_examples, load_raw
from lora_ns.data.render import prompt_text, render, sft_defaults
from lora_ns.data.stats import describe_padding, padding_stats

__all__ = ["FORMATTERS", "Formatter", "RowError", "get_formatter", "build_datasets", "load_raw",
           "formatted_examples", "encode_pairs", "label_id", "render", "prompt_text", "sft_defaults",
           "padding_stats", "describe_padding"]
