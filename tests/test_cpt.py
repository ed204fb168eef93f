"""Continued pretraining on raw text: in memory and streamed, the shipped legal_cpt recipe included."""

from __future__ import annotations

from pathlib import Path

from lora_ns.config import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parent.parent
# Each step trains on a new batch, so first and last loss are not comparable: a run is compared with an
# lr-0 control that sees the same batches in the same order (same seed) without learning. The control's
# losses differ from the run's only by what was learned (float noise ~1e-6); 8 steps at lr 1e-2 learn
# ~0.15 nats, so 0.05 nats of the last two steps is a real margin that lr 0 (difference 0) cannot meet.
MARGIN = 0.05


def cpt_recipe(out, streaming: bool, **training):
    return parse_recipe({
        "task": "cpt",
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "dataset": {"path": "sample:cpt_text", "formatter": "text", "streaming": streaming},
        "training": {"output_dir": str(out), "max_steps": 8, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "max_length": 64, "seed": 0, "report_to": "none", "save_strategy": "no", **training},
    }, source="test.yaml")


def losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def learned(out, streaming: bool, **training) -> tuple[object, dict]:
    """Train, and check the run beat its lr-0 control on the same batches by MARGIN (last two steps)."""
    from lora_ns.train import run_training

    trainer, summary = run_training(cpt_recipe(out / "run", streaming, **training))
    control, _ = run_training(cpt_recipe(out / "control", streaming, **{**training, "learning_rate": 0.0}))
    run, still = losses(trainer), losses(control)
    assert len(run) == len(still) == summary["steps"] == 8, (run, still)
    assert run[0] == still[0], (run, still)  # same first batch, same start: the control is comparable
    assert sum(run[-2:]) / 2 < sum(still[-2:]) / 2 - MARGIN, (run, still)
    return trainer, summary


def test_cpt_in_memory_trains_on_every_token(tmp_path, tiny_llama):
    trainer, summary = learned(tmp_path, streaming=False)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] == batch["input_ids"][real]).all()  # no prompt mask: all text is target
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_cpt_streamed_with_wrapped_packing(tmp_path, tiny_llama):
    from datasets import IterableDataset

    trainer, summary = learned(tmp_path, streaming=True, packing=True, packing_strategy="wrapped")
    assert isinstance(trainer.train_dataset, IterableDataset)
    first = next(iter(trainer.train_dataset))
    assert len(first["input_ids"]) == 64  # packed into full max_length blocks
    assert (tmp_path / "run" / "run_summary.json").is_file()


def test_shipped_legal_cpt_recipe_trains_on_tiny_model(tmp_path, tiny_llama):
    """recipes/legal_cpt.yaml as shipped (full fine-tune, streaming, wrapped packing), scaled down."""
    from lora_ns.train import train

    recipe = load_recipe(REPO / "recipes" / "legal_cpt.yaml", [
        "model.name_or_path=builtin:tiny-llama", "model.dtype=fp32", "dataset.path=sample:cpt_text",
        f"training.output_dir={tmp_path / 'out'}", "training.max_steps=6", "training.gradient_accumulation_steps=1",
        "training.per_device_train_batch_size=4", "training.max_length=64", "training.bf16=false",
        "training.learning_rate=5e-3", "training.warmup_steps=0", "training.logging_steps=1",
        "training.report_to=none"])
    assert recipe.task == "cpt" and recipe.peft.method == "full" and recipe.dataset.streaming
    summary = train(recipe)
    assert summary["steps"] == 6 and summary["trainable_params"] == summary["total_params"]
    # Streamed: a new batch each step. The lr-0 control of this run goes 6.96 -> 6.93 (batch noise, 0.03),
    # 6 steps at 5e-3 reach ~6.2; 0.1 is above the batch noise and far below what is learned.
    assert summary["last_loss"] < summary["first_loss"] - 0.1, summary
    assert (tmp_path / "out" / "model.safetensors").is_file()
