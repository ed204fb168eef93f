"""Launch checks for `validate --accelerate-config`: recipe settings that clash with DeepSpeed/FSDP."""

from __future__ import annotations

from lora_ns.config import Recipe
from lora_ns.errors import Problem


def check_launch(recipe: Recipe, accelerate_config: str) -> list[Problem]:
    """Problems from combining this recipe with an accelerate config (filled in by the scale work)."""
    return []
