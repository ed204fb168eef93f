"""Datasets: load raw rows (Hub or local files), format them with a named formatter, render them for TRL.

Public API (heavy libraries are imported only when these run):

- `build_datasets(recipe, tokenizer) -> (train, eval | None)`: what the trainers get.
- `load_raw(cfg, split=None)`: raw rows (`Dataset`, or `IterableDataset` when streaming).
- `formatted_examples(recipe, split=None, limit=None)`: canonical un-rendered examples + metadata,
  for evaluation (``split=recipe.dataset.val_split`` gives exactly the evaluation rows).
- `encode_pairs(dataset, tokenizer, max_length, label_names)`, `label_id`: seq_cls rows and labels.
- `FORMATTERS` / `get_formatter(name)`; `render`, `prompt_text`, `split_last_reply`, `sft_defaults`.
"""

# Order matters: preference registers more formatters and uses render.
from lora_ns.data.formatters import FORMATTERS, Formatter, RowError, get_formatter
from lora_ns.data.render import prompt_text, render, sft_defaults, split_last_reply
from lora_ns.data import preference  # noqa: F401  (registers the dpo/orpo/kto/grpo formatters)
from lora_ns.data.loading import build_datasets, encode_pairs, formatted_examples, label_id, load_raw

__all__ = ["FORMATTERS", "Formatter", "RowError", "get_formatter", "build_datasets", "load_raw",
           "formatted_examples", "encode_pairs", "label_id", "render", "prompt_text", "split_last_reply",
           "sft_defaults"]
