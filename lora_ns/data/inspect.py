"""Dataset checks for `validate`: read a small sample, report missing columns and length stats."""

from __future__ import annotations

from lora_ns.config import Recipe
from lora_ns.errors import Problem


def check_dataset(recipe: Recipe) -> list[Problem]:
    """Problems found in a small sample of the recipe's dataset (filled in by the data work)."""
    return []
