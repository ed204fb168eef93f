"""Every shipped recipe stays runnable: validated as shipped, then trained 2 steps with its model and
data swapped for the offline tiny model and the bundled sample in the same schema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora_ns.config import load_recipe
from lora_ns.setup import check_recipe_file

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def offline_overrides(path: Path, out: Path) -> list[str]:
    """Overrides that keep the recipe's method, formatter and training options but need no Hub."""
    recipe = load_recipe(path)
    model = "builtin:tiny-bert" if recipe.task == "seq_cls" else "builtin:tiny-llama"
    overrides = [f"model.name_or_path={model}", f"dataset.path=sample:{recipe.dataset.formatter}",
                 "dataset.name=null", "dataset.revision=null",  # streaming kept: the local sample streams too
                 "model.dtype=fp32", "training.bf16=false", "training.fp16=false",
                 "training.max_steps=2", "training.per_device_train_batch_size=2",
                 "training.gradient_accumulation_steps=1", "training.report_to=none", "training.logging_steps=1",
                 "training.logging_nan_inf_filter=false",  # log a NaN loss as NaN (HF's default logs it as 0.0)
                 f"training.output_dir={out}"]
    if recipe.quantization.load_in_4bit:
        overrides.append("quantization.bnb_4bit_compute_dtype=fp32")
    if recipe.dataset.val_split is not None:
        overrides += ["dataset.val_split=0.25", "training.eval_steps=1", "training.save_steps=1"]
    if recipe.task == "grpo":  # GRPOConfig has no max_length; keep the sampled completions short
        overrides += ["training.max_completion_length=16", "training.steps_per_generation=2",
                      "training.num_generations=2"]
    elif recipe.task != "seq_cls":
        overrides.append("training.max_length=128")
    if "max_completion_length" in recipe.training and recipe.task != "grpo":  # orpo: must stay below max_length
        overrides.append("training.max_completion_length=64")
    if recipe.task == "pretrain":  # the tiny architecture and its tokenizer, not GPT-2's
        overrides += ["model.config=tiny", "model.tokenizer_name_or_path=builtin:tiny-llama"]
    return overrides


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_offline(path, tmp_path):
    from lora_ns.train import train

    out = tmp_path / "out"
    recipe = check_recipe_file(path, offline_overrides(path, out), for_training=True)
    summary = train(recipe)
    assert summary["steps"] == 2
    # Both steps logged a finite loss (a NaN/inf from a bad dtype, scale or learning rate fails here).
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
    assert math.isfinite(summary["train_loss"]), summary
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2
    saved = load_recipe(out / "recipe.yaml")
    assert saved.peft.method == recipe.peft.method and saved.dataset.formatter == recipe.dataset.formatter
    weights = ["adapter_model.safetensors"] if recipe.peft.method != "full" else ["model.safetensors"]
    from safetensors.torch import load_file

    for name in weights:
        assert all(t.isfinite().all() for t in load_file(str(out / name)).values()), f"{name}: NaN/inf weights"
