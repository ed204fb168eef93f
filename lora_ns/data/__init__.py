"""Datasets: load raw rows (Hub or local files), format them with a named formatter, render them for TRL.
Heavy libraries are imported only when these functions run."""

# Order matters: preference registers more formatters and uses render.
from lora_ns.data.formatters import FORMATTERS, Formatter, RowError
from lora_ns.data.render import prompt_text, render, sft_defaults, split_last_reply
from lora_ns.data import preference  # noqa: F401  (registers the dpo/orpo/kto/grpo formatters)
from lora_ns.data.loading import build_datasets, encode_pairs, formatted_examples, label_id, load_raw

__all__ = ["FORMATTERS", "Formatter", "RowError", "build_datasets", "load_raw",
           "formatted_examples", "encode_pairs", "label_id", "render", "prompt_text", "split_last_reply",
           "sft_defaults"]
