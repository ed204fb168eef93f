"""Model checks for `validate`: load only the model config (meta device), check target_modules exist."""

from __future__ import annotations

from lora_ns.config import Recipe
from lora_ns.errors import Problem


def check_model(recipe: Recipe) -> list[Problem]:
    """Problems found from the model config alone (filled in by the training-core work)."""
    return []
