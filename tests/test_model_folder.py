"""A local model folder training cannot load is refused by validate (train's own set-up), not found out by
`from_pretrained` after the data is prepared; bench/sweep_models.py sweeps more ways to spoil one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lora_ns.config import parse_recipe
from lora_ns.errors import UserError
from lora_ns.setup import setup


def recipe_on(folder: Path, task: str = "causal_lm", out: Path | None = None):
    seq_cls = task == "seq_cls"
    return parse_recipe({
        "task": task,
        "model": {"name_or_path": str(folder), "dtype": "fp32", **({"num_labels": 2} if seq_cls else {})},
        "peft": {"method": "lora", "r": 4, **({"target_modules": ["query", "value"]} if seq_cls else {})},
        "dataset": {"path": f"sample:{'glue_mrpc' if seq_cls else 'gsm8k'}",
                    "formatter": "glue_mrpc" if seq_cls else "gsm8k", "max_samples": 8},
        "training": {"output_dir": str(out or folder.parent / "run"), "max_steps": 2, "report_to": "none",
                     "per_device_train_batch_size": 4, "save_strategy": "no"},
    }, source="r.yaml")


def copy_of(model: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "model"))


def edit_config(folder: Path, **change) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, **change}), encoding="utf-8")


def refusal(recipe) -> str:
    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    return str(err.value)


def test_weights_from_pretrained_cannot_load_are_refused(tmp_path, tiny_llama):
    """Missing, cut short, a shard gone, or shaped unlike config.json: each passed validate (which reads no
    weights) and failed in training, after the data was prepared."""
    from transformers import AutoModelForCausalLM

    folder = copy_of(tiny_llama, tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "cannot read" in refusal(recipe_on(folder)) and "model.safetensors" in refusal(recipe_on(folder))
    (folder / "model.safetensors").unlink()
    assert "has no model.safetensors: no weights" in refusal(recipe_on(folder))
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and setup(recipe_on(folder), dry_run=True)  # sharded: fine
    shards[1].unlink()
    assert f"has no {shards[1].name} (one of {len(shards)} shards)" in refusal(recipe_on(folder))
    folder = copy_of(tiny_llama, tmp_path / "edited")
    edit_config(folder, intermediate_size=96)
    assert re.search(r"mlp\.\w+_proj\.weight is \[(128, 64|64, 128)\], but config.json builds \[(96, 64|64, 96)\]",
                     refusal(recipe_on(folder)))


def test_a_classifier_saved_for_other_classes_trains_a_new_head(tmp_path, tiny_bert, caplog):
    """A 3-class classifier fine-tuned for 2 classes: from_pretrained refused the head's shape in training
    (and in infer); the head is now trained anew, with a warning saying how to keep the saved one."""
    from transformers import AutoModelForSequenceClassification

    from lora_ns.inference import classify, load
    from lora_ns.train import run_training

    folder = tmp_path / "three"
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tiny_bert) / name, folder)
    recipe = recipe_on(folder, "seq_cls", tmp_path / "run")
    (warning,) = [p for p in setup(recipe, dry_run=True).notes if p.field == "model.name_or_path"]
    assert warning.severity == "warning" and "classifier is for 3 classes, the recipe's for 2" in warning.message
    caplog.clear()
    run_training(recipe)
    # the classes go to transformers as a map: num_labels against the checkpoint's map of 3 warned twice
    assert not [r for r in caplog.records if "incompatible" in r.getMessage()]
    (result,) = classify(load(str(tmp_path / "run")), [("a cat", "a dog")])
    assert len(result["probabilities"]) == 2


def test_a_tokenizer_training_cannot_load_or_read_with_is_refused(tmp_path, tiny_llama, tiny_bert):
    """A folder saved without its tokenizer: Llama's failed to load in training (validate only warned, as for
    an unreachable Hub model); BERT's loads *empty* (5 special tokens) and trained on [UNK] alone."""
    folder = copy_of(tiny_llama, tmp_path / "llama")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert f"model.name_or_path: cannot load the tokenizer in {folder}" in refusal(recipe_on(folder))
    folder = copy_of(tiny_bert, tmp_path / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert "of the sampled rows' tokens are [UNK] (unknown): the tokenizer (5 tokens) cannot read this text" in \
        refusal(recipe_on(folder, "seq_cls"))


def test_a_local_config_transformers_cannot_build_is_an_error(tmp_path, tiny_llama):
    """An unknown model_type (a newer model than this transformers): validate warned, as for the Hub."""
    folder = copy_of(tiny_llama, tmp_path)
    edit_config(folder, model_type="llamax")
    message = refusal(recipe_on(folder))
    assert "model.name_or_path: cannot load its config.json" in message and "llamax" in message
