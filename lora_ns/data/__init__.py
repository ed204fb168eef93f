"""Datasets: load raw rows (Hub or local files), format them with a named formatter, render them for TRL.
Heavy libraries are imported only when these functions run."""

# Re-exported. Order matters: preference registers more formatters and uses render.
from lora_ns.data.formatters import FORMATTERS  # noqa: F401
from lora_ns.data.render import prompt_text, render, sft_defaults, split_last_reply  # noqa: F401
from lora_ns.data import preference  # noqa: F401  (registers the dpo/orpo/kto/grpo formatters)
from lora_ns.data.loading import (  # noqa: F401
    build_datasets, encode_pairs, formatted_examples, is_pair, label_id,
)
