"""peft.init_from: a new run starts from an earlier adapter's weights (not fresh ones); validate checks the folder."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import REPO
from lora_ns.config import load_recipe
from lora_ns.errors import UserError

QUICK = ["training.max_steps=3", "training.logging_steps=1", "training.save_strategy=no",
         "training.eval_strategy=no", "training.eval_on_start=false", "dataset.val_split=null"]


def run(tmp_path, name: str, *overrides: str):
    from lora_ns.train import train

    out = tmp_path / name
    train(load_recipe(REPO / "recipes" / "quickstart.yaml", [f"training.output_dir={out}", *QUICK, *overrides]))
    return load_file(str(out / "adapter_model.safetensors"))


def test_continued_adapter_starts_from_the_old_weights(tiny_llama, tmp_path):
    first = run(tmp_path, "first")
    # lr 0: the continued run cannot move, so its saved adapter is exactly where it started
    again = run(tmp_path, "again", f"peft.init_from={tmp_path / 'first'}", "training.learning_rate=0")
    fresh = run(tmp_path, "fresh", "training.learning_rate=0")
    assert first.keys() == again.keys()
    assert all(bool((first[k] == again[k]).all()) for k in first)
    b_keys = [k for k in first if "lora_B" in k]
    assert b_keys and all(float(fresh[k].abs().max()) == 0.0 for k in b_keys)  # fresh LoRA B starts at zero
    assert any(float(first[k].abs().max()) > 0.0 for k in b_keys)  # so equality above means something


@pytest.mark.parametrize("override, message", [
    ("peft.init_from=/nonexistent/adapter", "not found"),
    ("peft.method=adalora", "holds a LORA adapter"),
    # peft had answered with a page of target modules missing from the classifier
    ("task=seq_cls", "holds a CAUSAL_LM adapter, this seq_cls recipe trains a SEQ_CLS one"),
])
def test_validate_checks_the_adapter_folder(tiny_llama, tmp_path, override, message):
    from lora_ns.setup import setup

    run(tmp_path, "first")
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        f"training.output_dir={tmp_path / 'next'}", f"peft.init_from={tmp_path / 'first'}", override])
    with pytest.raises(UserError, match=message) as err:
        setup(recipe, dry_run=True)
    assert "peft.init_from" in str(err.value)
