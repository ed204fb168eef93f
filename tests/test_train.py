"""lora_ns.train: defaults, loss masks, tokenizer set-up, the run's output folder, and the CLI end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns.config import parse_recipe
from lora_ns.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def recipe_dict(out, formatter: str = "gsm8k", path: str = "sample:gsm8k", **training) -> dict:
    return {
        "task": "causal_lm",
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "peft": {"method": "lora", "r": 4},
        "dataset": {"path": path, "formatter": formatter, "max_samples": 8},
        "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256,
                     "report_to": "none", **training},
    }


def test_lora_ns_defaults_and_recipe_values_win(tmp_path):
    from lora_ns.setup import training_arguments

    args = training_arguments(parse_recipe(recipe_dict(tmp_path, report_to="tensorboard")))
    assert args.save_strategy == "steps" and args.save_total_limit == 2  # resumable by default
    assert args.report_to == ["tensorboard"] and args.use_cpu and not args.bf16
    assert args.gradient_checkpointing is False and args.eval_strategy == "no"
    assert args.completion_only_loss is True and args.packing is False
    args = training_arguments(parse_recipe(recipe_dict(tmp_path, save_strategy=False, gradient_checkpointing=True,
                                                        completion_only_loss=False, logging_steps=3)))
    assert args.save_strategy == "no"  # YAML's bare `no` arrives as False
    assert args.gradient_checkpointing and args.logging_steps == 3
    assert args.completion_only_loss is False


def test_packing_defaults_on_with_flash_attention_only(tmp_path):
    from lora_ns.setup import training_arguments

    flash = recipe_dict(tmp_path)
    flash["model"]["attn_implementation"] = "flash_attention_2"
    args = training_arguments(parse_recipe(flash))
    assert args.packing is True and args.packing_strategy == "bfd"
    flash["training"]["packing"] = False  # the recipe wins
    assert training_arguments(parse_recipe(flash)).packing is False


def test_chat_rows_default_to_assistant_only_loss(tmp_path):
    from lora_ns.setup import training_arguments

    chat = recipe_dict(tmp_path, formatter="code_feedback", path="sample:code_feedback")
    assert training_arguments(parse_recipe(chat)).assistant_only_loss is True
    chat["training"]["assistant_only_loss"] = False
    assert training_arguments(parse_recipe(chat)).assistant_only_loss is False


def labelled_share(recipe: dict) -> float:
    """Share of real (non-pad) tokens that carry a label in the first collated training batch."""
    from lora_ns.setup import setup
    from lora_ns.train import prepare

    recipe = parse_recipe(recipe)
    trainer, _, _ = prepare(recipe, setup(recipe, dry_run=False).args)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    real = batch["attention_mask"].bool()
    return float((batch["labels"][real] != -100).float().mean())


@pytest.mark.parametrize("formatter, path, switch", [
    ("gsm8k", "sample:gsm8k", "completion_only_loss"),
    ("code_feedback", "sample:code_feedback", "assistant_only_loss"),
])
def test_loss_on_the_answer_only_by_default_everything_when_asked(formatter, path, switch, tmp_path, tiny_llama):
    answer_only = labelled_share(recipe_dict(tmp_path / "a", formatter, path))
    everything = labelled_share(recipe_dict(tmp_path / "b", formatter, path, **{switch: False}))
    assert 0.05 < answer_only < 0.95
    assert everything == 1.0


def test_tokenizer_gets_pad_token_and_recipe_chat_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from lora_ns.model import load_tokenizer

    bare = AutoTokenizer.from_pretrained(tiny_llama)
    bare.pad_token, bare.chat_template = None, None
    bare.save_pretrained(tmp_path / "tok")
    recipe = recipe_dict(tmp_path)
    recipe["model"].update(tokenizer_name_or_path=str(tmp_path / "tok"), chat_template="{{ messages[0]['content'] }}")
    tokenizer = load_tokenizer(parse_recipe(recipe))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    replaced = load_tokenizer(parse_recipe({**recipe, "model": {**recipe["model"], "tokenizer_name_or_path": None}}))
    assert replaced.pad_token == "<|endoftext|>"  # the tokenizer's own pad token is kept
    assert replaced.chat_template == "{{ messages[0]['content'] }}"  # the recipe's template replaces its own


def test_missing_flash_attention_stops_before_loading(tmp_path, tiny_llama, capsys):
    import importlib.util

    from lora_ns.errors import run_cli
    from lora_ns.model import load_model
    from lora_ns.train import main

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    data = recipe_dict(tmp_path / "out")
    data["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
        load_model(parse_recipe(data))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert run_cli("lora_ns.train", lambda: main([str(tmp_path / "r.yaml")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora_ns.train: error: ") and "flash-attn" in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_saved_recipe_never_holds_tokens(tmp_path):
    from lora_ns.train import saved_recipe

    text = saved_recipe(parse_recipe(recipe_dict(tmp_path, hub_token="hf_SECRETsecret", eos_token="<|im_end|>")))
    assert "hf_SECRET" not in text and "hub_token" not in text
    assert yaml.safe_load(text)["training"]["eos_token"] == "<|im_end|>"  # not a credential: kept


def test_cli_trains_end_to_end_and_writes_the_run_folder(tmp_path, tiny_llama):
    """One subprocess run of ``python -m lora_ns.train`` with overrides, as a user would."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict("outputs/run", report_to="tensorboard")))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lora_ns.train", "r.yaml", "training.max_steps=3", "--training.logging_steps", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "versions.json", "trainer_state.json", "run_summary.json"):
        assert (out / name).is_file(), name
    weights = [p.name for p in out.rglob("*") if p.name.startswith(("adapter_model", "model", "pytorch_model"))]
    assert weights and all(name.endswith(".safetensors") for name in weights), weights
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == "lora" and summary["trainable_params"] > 0
    assert json.loads((out / "versions.json").read_text())["peft"]
    saved = (out / "recipe.yaml").read_text()
    assert yaml.safe_load(saved)["training"]["max_steps"] == 3  # the overrides are in the saved recipe
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # tensorboard logged
    assert "trainable params:" in done.stdout
    assert (out / "run_summary.json").stat().st_mtime_ns >= (out / "recipe.yaml").stat().st_mtime_ns


def test_saved_recipe_pins_auto_dtypes(tmp_path):
    from lora_ns.config import Recipe
    from lora_ns.train import saved_recipe

    data = recipe_dict(tmp_path, hub_token="hf_secret_value")
    data["model"]["dtype"] = "auto"
    data["quantization"] = {"load_in_4bit": True}
    data["peft"]["method"] = "qlora"
    recipe = Recipe.model_validate(data)  # schema only: the secret rule would refuse this recipe
    import torch

    saved = yaml.safe_load(saved_recipe(recipe))
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert saved["model"]["dtype"] == expected
    assert saved["quantization"]["bnb_4bit_compute_dtype"] == expected
    assert "hf_secret_value" not in saved_recipe(recipe)
