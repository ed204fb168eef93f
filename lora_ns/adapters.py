"""Build the peft config a recipe asks for and wrap the model with it."""

from __future__ import annotations

from typing import Any

from lora_ns.config import Recipe

_PEFT_CLASS = {"lora": "LoraConfig", "qlora": "LoraConfig", "adalora": "AdaLoraConfig", "ia3": "IA3Config",
               "prefix_tuning": "PrefixTuningConfig", "prompt_tuning": "PromptTuningConfig"}
# Classification heads that must be trained and saved with the adapter.
SEQ_CLS_HEADS = ["classifier", "score"]


def peft_config(recipe: Recipe):
    """A peft config object, or None for full fine-tuning."""
    method = recipe.peft.method
    if method == "full":
        return None
    import peft

    options: dict[str, Any] = recipe.peft.options
    task_type = "SEQ_CLS" if recipe.task == "seq_cls" else "CAUSAL_LM"
    if method in ("lora", "qlora", "adalora"):
        options.setdefault("target_modules", "all-linear")
    if recipe.task == "seq_cls" and method in ("lora", "qlora", "adalora", "ia3"):
        options.setdefault("modules_to_save", SEQ_CLS_HEADS)
    return getattr(peft, _PEFT_CLASS[method])(task_type=task_type, **options)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def apply_peft(model, recipe: Recipe):
    config = peft_config(recipe)
    if config is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, config)
