"""Datasets: load raw rows (hub or local files), format them with a named formatter, render for TRL."""

from lora_ns.data.formatters import FORMATTERS, Formatter, get_formatter
from lora_ns.data.loading import build_datasets, load_raw

__all__ = ["FORMATTERS", "Formatter", "get_formatter", "build_datasets", "load_raw"]
