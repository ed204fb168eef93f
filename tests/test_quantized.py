"""QLoRA (4-bit nf4) and 8-bit LoRA really train here: bitsandbytes 0.50 runs them on the CPU."""

from __future__ import annotations

import json

import pytest

from lora_ns.config import parse_recipe

STEPS = 8


def quantized_recipe(out, quantization: dict, method: str = "qlora"):
    return parse_recipe({
        "task": "causal_lm",
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "quantization": quantization,
        "peft": {"method": method, "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 8},
        "training": {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 8,
                     "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "max_length": 64, "seed": 0, "report_to": "none", "save_strategy": "no"},
    }, source="test.yaml")


FOUR_BIT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "fp32"}


@pytest.mark.parametrize("quantization, method, layer", [
    (FOUR_BIT, "qlora", "Linear4bit"),
    ({"load_in_8bit": True}, "lora", "Linear8bitLt"),
])
def test_quantized_lora_trains(quantization, method, layer, tmp_path, tiny_llama):
    from lora_ns.train import run_training

    trainer, summary = run_training(quantized_recipe(tmp_path / "out", quantization, method))
    base_layers = {type(m).__name__ for m in trainer.model.base_model.model.modules()}
    assert layer in base_layers  # the base really is quantized, LoRA sits on bitsandbytes layers
    assert summary["steps"] == STEPS
    assert summary["last_loss"] < summary["first_loss"] - 0.02, summary
    assert trainer.args.gradient_checkpointing  # lora_ns default for quantized models
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 8


@pytest.mark.parametrize("quantization, method, layer", [
    (FOUR_BIT, "qlora", "Linear4bit"),
    ({"load_in_8bit": True}, "lora", "Linear8bitLt"),
])
def test_a_quantized_classifier_trains_its_head_whole(quantization, method, layer, tmp_path, tiny_bert):
    """peft trains a copy of the head (modules_to_save): quantized, it failed bitsandbytes' checks at step 1."""
    from lora_ns.train import run_training

    recipe = quantized_recipe(tmp_path / "out", quantization, method)
    recipe = recipe.model_copy(update={"task": "seq_cls"})
    recipe.model = recipe.model.model_copy(update={"name_or_path": "builtin:tiny-bert", "num_labels": 2})
    recipe.peft.options["target_modules"] = ["query", "value"]
    recipe.dataset = recipe.dataset.model_copy(update={"path": "sample:glue_mrpc", "formatter": "glue_mrpc"})
    recipe.training.pop("max_length")
    trainer, summary = run_training(recipe)
    model = trainer.model.base_model.model
    assert layer in {type(m).__name__ for m in model.modules()}  # the encoder is quantized...
    assert type(model.classifier.modules_to_save["default"]).__name__ == "Linear"  # ...the trained head not
    assert summary["steps"] == STEPS


def test_quantization_config_follows_recipe():
    import torch

    from lora_ns.model import quantization_config

    recipe = quantized_recipe("unused", {**FOUR_BIT, "bnb_4bit_quant_type": "fp4", "bnb_4bit_quant_storage": "bf16",
                                         "bnb_4bit_use_double_quant": False})
    config = quantization_config(recipe)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_quant_storage == torch.bfloat16 and not config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    assert quantization_config(quantized_recipe("unused", {"load_in_8bit": True}, "lora")).load_in_8bit


def test_missing_bitsandbytes_is_one_line_at_validate(monkeypatch):
    import importlib.util

    from lora_ns.validate import model as model_check

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    problem = model_check.bitsandbytes_problem(quantized_recipe("unused", FOUR_BIT))
    assert problem.is_error and "bitsandbytes, which is not installed" in str(problem)
    assert "\n" not in str(problem) and problem.field == "quantization.load_in_4bit"


def test_bitsandbytes_without_backend_is_one_line_at_validate(monkeypatch):
    from lora_ns.validate import model as model_check

    assert model_check.bitsandbytes_problem(quantized_recipe("unused", FOUR_BIT)) is None  # it runs here

    def no_backend(*args):
        raise RuntimeError("No kernel registered for this device\nlong traceback text")

    monkeypatch.setattr(model_check, "_bitsandbytes_smoke_test", no_backend)
    problem = model_check.bitsandbytes_problem(quantized_recipe("unused", {"load_in_8bit": True}, "lora"))
    assert str(problem).count("\n") == 0 and "cannot run on this machine: No kernel registered" in str(problem)
    assert problem.field == "quantization.load_in_8bit"

