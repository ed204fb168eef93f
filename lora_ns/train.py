"""``accelerate launch -m lora_ns.train RECIPE.yaml [key.sub=value ...]``: train a recipe.

The libraries do the work: TRL's SFTTrainer for causal_lm and cpt, transformers' Trainer for
seq_cls, peft for adapters. This module only wires the recipe into them and writes the run's
record (resolved recipe, library versions, summary) next to the adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lora_ns.errors import UserError, run_cli

PROG = "lora_ns.train"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_ns.train", description="Fine-tune a model as a recipe describes.",
        epilog="Overrides: key.sub=value or --key.sub value, e.g. training.max_steps=10 --peft.r 8")
    parser.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
    return parser


def training_arguments(recipe, eval_dataset) -> Any:
    """SFTConfig (causal_lm, cpt) or TrainingArguments (seq_cls) from the recipe's training section."""
    import torch

    from lora_ns.hf_fields import LORA_NS_TRAINING_FIELDS
    from lora_ns.model import torch_dtype

    args = {k: v for k, v in recipe.training.items()
            if k not in LORA_NS_TRAINING_FIELDS and k != "resume_from_checkpoint"}
    args["output_dir"] = recipe.output_dir
    args.setdefault("report_to", "none")
    args.setdefault("save_strategy", "no")
    # Mixed precision follows the model dtype unless the recipe says otherwise.
    dtype = torch_dtype(recipe.model.dtype)
    args.setdefault("bf16", dtype == torch.bfloat16)
    args.setdefault("fp16", dtype == torch.float16)
    if eval_dataset is None:
        args.setdefault("eval_strategy", "no")
    if recipe.task == "seq_cls":
        from transformers import TrainingArguments as config_class
    else:
        from trl import SFTConfig as config_class
    try:
        return config_class(**args)
    except ValueError as err:  # the HF classes check combinations of values in __post_init__
        raise UserError(recipe.problem("training", str(err).strip().splitlines()[0],
                                       "fix the training section (see the HF TrainingArguments docs)"))


def build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset):
    args = training_arguments(recipe, eval_dataset)
    if recipe.task == "seq_cls":
        from transformers import DataCollatorWithPadding, Trainer

        def encode(batch: dict[str, list]) -> dict[str, list]:
            pair = batch["sentence2"] if batch.get("sentence2") and batch["sentence2"][0] is not None else None
            enc = tokenizer(batch["sentence1"], pair, truncation=True, max_length=tokenizer.model_max_length)
            return {**enc, "labels": batch["label"]}

        cols = train_dataset.column_names
        train_dataset = train_dataset.map(encode, batched=True, remove_columns=cols)
        if eval_dataset is not None:
            eval_dataset = eval_dataset.map(encode, batched=True, remove_columns=eval_dataset.column_names)
        return Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("lora_ns", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def train(recipe) -> dict[str, Any]:
    """Train a validated recipe; return the run summary (also written to run_summary.json)."""
    from lora_ns.adapters import apply_peft, count_parameters
    from lora_ns.checkpoints import guard_output_dir, resume_target
    from lora_ns.data import build_datasets
    from lora_ns.model import load_model, load_tokenizer

    started = time.time()
    guard_output_dir(recipe)
    tokenizer = load_tokenizer(recipe)
    train_dataset, eval_dataset = build_datasets(recipe, tokenizer)
    model = apply_peft(load_model(recipe, tokenizer), recipe)
    trainable, total = count_parameters(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    trainer = build_trainer(recipe, model, tokenizer, train_dataset, eval_dataset)
    result = trainer.train(resume_from_checkpoint=resume_target(recipe))
    out = Path(recipe.output_dir)
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {"output_dir": str(out), "steps": trainer.state.global_step, "seconds": round(time.time() - started, 1),
               "train_loss": result.training_loss, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "trainable_params": trainable, "total_params": total}
    if trainer.is_world_process_zero():
        (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        (out / "versions.json").write_text(json.dumps(library_versions(), indent=2), encoding="utf-8")
        from lora_ns.report import write_report

        write_report(trainer.state.log_history, out, summary)
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")  # last: marks done
        print(f"done: {summary['steps']} steps in {summary['seconds']} s, loss {summary['first_loss']} -> "
              f"{summary['last_loss']}; adapter saved to {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args, args.overrides = make_parser().parse_known_args(argv)
    from lora_ns.validate import check_recipe_file

    recipe = check_recipe_file(args.recipe, args.overrides, for_training=True)
    train(recipe)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
