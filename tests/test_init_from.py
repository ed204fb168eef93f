"""peft.init_from: a new run starts from an earlier adapter's weights (not fresh ones); validate checks the folder."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from conftest import REPO
from lora_ns.config import load_recipe
from lora_ns.errors import UserError

QUICK = ["training.max_steps=3", "training.logging_steps=1", "training.save_strategy=no",
         "training.eval_strategy=no", "training.eval_on_start=false", "dataset.val_split=null"]


def run(tmp_path, name: str, *overrides: str, peft: dict | None = None):
    """Train the quickstart recipe 3 steps (with another peft section, if given); its saved adapter."""
    from lora_ns.train import train

    out, recipe = tmp_path / name, REPO / "recipes" / "quickstart.yaml"
    if peft:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text()),
                                          "peft": peft}))
    train(load_recipe(recipe, [f"training.output_dir={out}", *QUICK, *overrides]))
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("peft", [
    None,  # the quickstart's LoRA
    # peft loads prompt-learning adapters for inference only: ValueError after the weights had loaded
    {"method": "prompt_tuning", "num_virtual_tokens": 4},
])
def test_continued_adapter_starts_from_the_old_weights(tiny_llama, tmp_path, peft):
    first = run(tmp_path, "first", peft=peft)
    # lr 0: the continued run cannot move, so its saved adapter is exactly where it started
    again = run(tmp_path, "again", f"peft.init_from={tmp_path / 'first'}", "training.learning_rate=0", peft=peft)
    fresh = run(tmp_path, "fresh", "training.learning_rate=0", peft=peft)
    assert first.keys() == again.keys()
    assert all(bool((first[k] == again[k]).all()) for k in first)
    assert any(bool((first[k] != fresh[k]).any()) for k in first)  # so equality above means something
    b_keys = [k for k in first if "lora_B" in k]
    assert all(float(fresh[k].abs().max()) == 0.0 for k in b_keys)  # fresh LoRA B starts at zero


def test_a_continued_adalora_adapter_trains_the_ranks_it_was_allocated(tiny_llama, tmp_path):
    """An AdaLoRA adapter comes back cut to its allocated ranks; allocating them again (a budget meant for the
    full adapter) crashed in peft where a layer had kept none, as here (lr 0: every importance score ties)."""
    adalora = {"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 3}
    first = run(tmp_path, "first", "training.learning_rate=0", peft=adalora)
    assert any(0 in tensor.shape for tensor in first.values())  # the case that crashed
    again = run(tmp_path, "again", f"peft.init_from={tmp_path / 'first'}", "training.learning_rate=0",
                peft=adalora)
    assert first.keys() == again.keys()
    assert all(bool((first[k] == again[k]).all()) for k in first)


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


def test_an_adapter_folder_that_cannot_load_is_refused(tiny_llama, tmp_path):
    """Weights missing (peft then asked the Hub: HFValidationError), cut short (SafetensorError), only a pickle
    (which peft loaded), or not fitting the model (its config edited, or another base: a page of size
    mismatches): each passed validate and failed as training loaded it."""
    import shutil

    from lora_ns.setup import setup

    run(tmp_path, "first")

    def refusal(spoil) -> str:
        adapter = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tmp_path / "first", adapter)
        spoil(adapter)
        recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
            f"training.output_dir={tmp_path / 'next'}", f"peft.init_from={adapter}"])
        with pytest.raises(UserError) as err:
            setup(recipe, dry_run=True)
        return str(err.value)

    weights = "adapter_model.safetensors"
    assert f"{weights}: not found" in refusal(lambda a: (a / weights).unlink())
    assert f"{weights}: not found" in refusal(lambda a: (a / weights).rename(a / "adapter_model.bin"))
    cut = refusal(lambda a: (a / weights).write_bytes((a / weights).read_bytes()[:100]))
    assert f"{weights} is truncated" in cut

    def rank_two(adapter):
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    assert "does not fit this model: it holds base_model.model" in refusal(rank_two)


def test_a_projected_prefix_cannot_be_continued(tmp_path):
    """peft saves a prefix_projection adapter's projected prefix, not the projection: nothing to train on."""
    from lora_ns.setup import setup

    adapter = tmp_path / "projected"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prefix_projection": True}))
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        f"training.output_dir={tmp_path / 'next'}", f"peft.init_from={adapter}"])
    recipe.peft.method = "prefix_tuning"
    with pytest.raises(UserError, match="not the projection that trains") as err:
        setup(recipe, dry_run=True)
    assert "peft.init_from" in str(err.value)
