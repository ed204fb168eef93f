"""``accelerate launch -m lora_ns.train RECIPE.yaml [key.sub=value ...]``: train a recipe.

Also ``python -m lora_ns.train`` for one process. The libraries do the work: TRL's SFTTrainer for
causal_lm and cpt, transformers' Trainer for seq_cls, peft for adapters (`lora_ns.adapters`),
transformers + bitsandbytes for loading (`lora_ns.model`). This module wires the recipe into them
and writes the run's record next to the adapter.

Defaults lora_ns sets under the recipe's ``training:`` section (any key the recipe gives wins):

- ``report_to``: "tensorboard" when tensorboard is importable, else "none".
- ``logging_steps``: 10.
- ``save_strategy``: "steps" (every ``save_steps``, HF default 500) with ``save_total_limit: 2``,
  so an interrupted run resumes from its last checkpoint (``resume_from_checkpoint: auto``).
- ``gradient_checkpointing`` (transformers 5 calls it ``activation_checkpointing``; either name
  works): on when the model is quantized, off otherwise (TRL's default is on; turn it on for
  large models).
- ``use_cpu``: true when no CUDA GPU is visible. ``bf16`` / ``fp16`` follow ``model.dtype``.
- ``eval_strategy``: "no" when the recipe has no validation data.
- causal_lm: the loss is on the answer only (`lora_ns.data.sft_defaults`): prompt/completion rows
  get ``completion_only_loss: true``; chat rows (a formatter of kind "messages") get
  ``assistant_only_loss: true``, which needs {% generation %} markers in the chat template (TRL
  swaps in a marked template for known models). To train on every token instead, set
  ``training.completion_only_loss: false`` or ``training.assistant_only_loss: false``. cpt text
  rows train on every token.
- ``packing``: on (``packing_strategy: bfd``, padding-free) for causal_lm and cpt when
  ``model.attn_implementation`` is a flash-attention kernel, which runs the packed row as separate
  sequences. Packing is mask-correct with sdpa too (transformers turns the restarting
  ``position_ids`` into block-diagonal attention; tests/test_masks.py checks the logits), but sdpa
  then attends over the whole packed row, which costs more than the padding it saves on small
  models, so with sdpa/eager it stays off unless the recipe sets it. ``validate`` prints the padding
  fraction packing would remove.
- seq_cls: accuracy, F1, precision and recall at each evaluation (`lora_ns.metrics`).

Distributed runs: datasets are built and tokenized inside ``main_process_first`` (rank 0 fills the
cache, the others reuse it), quantized models load onto each rank's own GPU, and only the main
process writes recipe.yaml, versions.json, the tokenizer and run_summary.json (written last: it
marks a finished run, see `lora_ns.checkpoints`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lora_ns.checkpoints import FINISHED_MARKER
from lora_ns.command_line import CommandParser
from lora_ns.config import Recipe, load_recipe
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.fileio import write_text_atomic
from lora_ns.preference import PREFERENCE_TASKS  # light: TRL is imported lazily
from lora_ns.setup import Checks, print_notes, setup

PROG = "lora_ns.train"
# Training keys that hold credentials: never written to the saved recipe.
SECRET_KEYS = {"hub_token", "push_to_hub_token", "token"}


# Flags of the Hugging Face example scripts, taken as the recipe overrides they mean (snake_case works too).
HF_SCRIPT_FLAGS = {"--output-dir": "training.output_dir", "--model-name-or-path": "model.name_or_path",
                   "--dataset-name": "dataset.path"}


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m lora_ns.train", description="Fine-tune a model as a recipe describes.",
        epilog="Overrides: key.sub=value or --key.sub value, e.g. training.max_steps=10 --peft.r 8",
        aliases={"--config": "--recipe"})
    parser.add_argument("recipe", nargs="?", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("--recipe", dest="recipe_flag", help=argparse.SUPPRESS)  # --config: older scripts' name
    for flag, key in HF_SCRIPT_FLAGS.items():
        parser.add_argument(flag, help=f"same as {key}=VALUE")
    return parser


def recipe_and_overrides(argv: list[str] | None) -> tuple[str, list[str]]:
    args, overrides = make_parser().parse_known_args(argv)
    recipe = args.recipe_flag or args.recipe
    if args.recipe_flag and args.recipe:  # with --config, a bare key=value is an override, not the recipe
        overrides = [args.recipe, *overrides]
    if not recipe:
        raise UserError(Problem("<command line>", "recipe", "no recipe given", "pass a recipe path (see recipes/)"))
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in HF_SCRIPT_FLAGS.items()}
    flags = [f"{key}={value}" for key, value in given.items() if value is not None]
    return recipe, flags + overrides


def classification_eval(num_labels: int):
    """A Trainer ``compute_metrics`` reporting accuracy, F1, precision and recall."""
    from lora_ns.metrics import classification_metrics

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return classification_metrics(logits.argmax(-1), eval_pred.label_ids, num_labels)

    return compute_metrics


def build_trainer(recipe: Recipe, args, model, tokenizer, train_dataset, eval_dataset):
    """SFTTrainer (causal_lm, cpt) or Trainer with padding and classification metrics (seq_cls)."""
    from lora_ns.adapters import training_callbacks

    callbacks = training_callbacks(recipe)
    if recipe.task in PREFERENCE_TASKS:  # dpo/orpo/kto/grpo: lora_ns.preference
        from lora_ns.preference import build_trainer as preference_trainer

        return preference_trainer(recipe, args, model, tokenizer, train_dataset, eval_dataset, callbacks)
    if recipe.task == "seq_cls":
        from transformers import DataCollatorWithPadding, Trainer

        from lora_ns.data import encode_pairs

        max_length = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
        train_dataset = encode_pairs(train_dataset, tokenizer, max_length, recipe.model.labels, recipe.dataset.path)
        if eval_dataset is not None:
            eval_dataset = encode_pairs(eval_dataset, tokenizer, max_length, recipe.model.labels, recipe.dataset.path)
        metrics = classification_eval(model.config.num_labels) if eval_dataset is not None else None
        return Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                       compute_metrics=metrics, callbacks=callbacks)
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, callbacks=callbacks)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("lora_ns", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def saved_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, credentials removed, "auto" dtypes pinned to what this run used
    (so a later merge or evaluation reproduces the training precision, e.g. QLoRA's requantization)."""
    from lora_ns.model import dtype_name

    clean = recipe.model_copy(deep=True)
    clean.training = {k: v for k, v in recipe.training.items() if k not in SECRET_KEYS}
    if clean.model.dtype == "auto":
        clean.model.dtype = dtype_name(recipe.model.dtype)
    if clean.quantization.bnb_4bit_compute_dtype == "auto":
        clean.quantization.bnb_4bit_compute_dtype = clean.model.dtype
    return clean.to_yaml()


def run_summary(recipe: Recipe, trainer, result, trainable: int, total: int, started: float) -> dict[str, Any]:
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    evals = [e for e in history if any(k.startswith("eval_") for k in e)]
    return {"output_dir": recipe.output_dir, "task": recipe.task, "method": recipe.peft.method,
            "steps": trainer.state.global_step, "seconds": round(time.time() - started, 1),
            "train_loss": result.training_loss, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "eval": evals[-1] if evals else None,
            "trainable_params": trainable, "total_params": total}


def save_run(recipe: Recipe, trainer, tokenizer, summary: dict[str, Any]) -> None:
    """Adapter (or full model) as safetensors, trainer state, and the run record; run_summary.json last."""
    out = Path(recipe.output_dir)
    trainer.save_model(str(out))
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(out))
    write_text_atomic(out / "recipe.yaml", saved_recipe(recipe))
    write_text_atomic(out / "versions.json", json.dumps(library_versions(), indent=2))
    from lora_ns.report import write_report

    write_report(trainer.state.log_history, out, summary)
    write_text_atomic(out / FINISHED_MARKER, json.dumps(summary, indent=2))  # last: marks a finished run


def prepare(recipe: Recipe, args) -> tuple[Any, Any, tuple[int, int]]:
    """Load the model and data and build the trainer: (trainer, tokenizer, (trainable, total) parameters)."""
    from transformers import set_seed

    from lora_ns.adapters import apply_peft, count_parameters
    from lora_ns.data import build_datasets
    from lora_ns.model import load_model, load_tokenizer

    set_seed(args.seed)  # before peft creates (randomly initialised) adapter weights
    tokenizer = load_tokenizer(recipe)
    model = apply_peft(load_model(recipe, tokenizer), recipe)
    trainable, total = count_parameters(model)
    if args.process_index == 0:
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    with args.main_process_first(desc="build and tokenize the datasets"):
        if recipe.task == "pretrain":  # pretrain hook: tokenized, packed, cached shards
            from lora_ns.pretrain import pretrain_datasets as build_datasets
        train_dataset, eval_dataset = build_datasets(recipe, tokenizer)
        trainer = build_trainer(recipe, args, model, tokenizer, train_dataset, eval_dataset)
    return trainer, tokenizer, (trainable, total)


def run_training(recipe: Recipe, checks: Checks = Checks()) -> tuple[Any, dict[str, Any]]:
    """Set up (the same checks as validate), then load the weights, train and save; return the trainer
    (its model is the trained one) and the summary."""
    from lora_ns.checkpoints import disk_errors, resume_target

    started = time.time()
    ready = setup(recipe, dry_run=False, checks=checks)
    print_notes([n for n in ready.notes if n.severity == "warning"], PROG)
    trainer, tokenizer, (trainable, total) = prepare(recipe, ready.args)
    with disk_errors(recipe):
        result = trainer.train(resume_from_checkpoint=resume_target(recipe))
        summary = run_summary(recipe, trainer, result, trainable, total, started)
        save_run(recipe, trainer, tokenizer, summary)
    if trainer.is_world_process_zero():
        loss = summary["first_loss"], summary["last_loss"]
        what = "model" if recipe.peft.method == "full" else "adapter"
        print(f"done: {summary['steps']} steps in {summary['seconds']} s, loss "
              f"{_fmt(loss[0])} -> {_fmt(loss[1])}; {what} saved to {recipe.output_dir}")
    return trainer, summary


def train(recipe: Recipe, checks: Checks = Checks()) -> dict[str, Any]:
    """Train a recipe (set-up checks first); return the run summary (also written to run_summary.json)."""
    return run_training(recipe, checks)[1]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    recipe, overrides = recipe_and_overrides(argv)
    train(load_recipe(recipe, overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
