"""``accelerate launch -m lora_ns.train RECIPE.yaml [key.sub=value ...]`` (or ``python -m``): train a recipe.

The libraries do the work: TRL's SFTTrainer (causal_lm, cpt, pretrain) and preference trainers
(`lora_ns.preference`), transformers' Trainer (seq_cls), peft. This module wires the recipe into them (with
the defaults of `lora_ns.setup.training_defaults`; the recipe's keys win), resumes an interrupted run, and
saves the run with its record (`lora_ns.run_record`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

from lora_ns.adapters import apply_peft, count_parameters, training_callbacks
from lora_ns.checkpoints import last_checkpoint, one_writer, resume_problem, resume_target
from lora_ns.command_line import CommandParser
from lora_ns.config import Recipe, load_recipe
from lora_ns.data import build_datasets, encode_pairs, is_pair
from lora_ns.data.loading import read_every_row
from lora_ns.data.sources import source_for
from lora_ns.errors import Problem, UserError, first_line, run_cli
from lora_ns.metrics import classification_metrics
from lora_ns.model import eos_problem, load_model, load_tokenizer, tokenizer_field, vocabulary_problem
from lora_ns.preference import PREFERENCE_TASKS, preference_trainer, try_prompt_templates
from lora_ns.pretrain import pretrain_datasets
from lora_ns.run_record import save_run
from lora_ns.setup import Checks, library_problem, named_keys, print_notes, setup

PROG = "lora_ns.train"
# Flags of the Hugging Face example scripts, taken as the recipe overrides they mean (snake_case works too).
HF_SCRIPT_FLAGS = {"--output-dir": "training.output_dir", "--model-name-or-path": "model.name_or_path",
                   "--dataset-name": "dataset.path"}


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m lora_ns.train", description="Fine-tune a model as a recipe describes.",
        epilog="Overrides: key.sub=value or --key.sub value, e.g. training.max_steps=10 --peft.r 8",
        aliases={"--config": "--recipe"}, paths=("recipe", "recipe_flag"))
    parser.add_argument("recipe", nargs="?", help="path to a recipe YAML (see recipes/)")
    parser.add_argument("--recipe", dest="recipe_flag", help=argparse.SUPPRESS)  # --config: older scripts
    for flag, key in HF_SCRIPT_FLAGS.items():
        parser.add_argument(flag, help=f"same as {key}=VALUE")
    return parser


def recipe_and_overrides(argv: list[str] | None) -> tuple[str, list[str]]:
    args, overrides = make_parser().parse_known_args(argv)
    recipe = args.recipe_flag or args.recipe
    if args.recipe_flag and args.recipe:  # with --config, a bare key=value is an override, not the recipe
        overrides = [args.recipe, *overrides]
    if not recipe:
        raise UserError(Problem("<command line>", "recipe", "no recipe given",
                                "pass a recipe path (see recipes/)"))
    given = {key: getattr(args, flag[2:].replace("-", "_")) for flag, key in HF_SCRIPT_FLAGS.items()}
    return recipe, [f"{key}={value}" for key, value in given.items() if value is not None] + overrides


# --- the trainer ----------------------------------------------------------------------------------

def build_trainer(recipe: Recipe, args, model, tokenizer, train_dataset, eval_dataset):
    """The task's trainer on an already peft-wrapped (or full) model."""
    kwargs = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                  processing_class=tokenizer, callbacks=training_callbacks(recipe))
    if recipe.task in PREFERENCE_TASKS:
        return preference_trainer(recipe, **kwargs)
    if recipe.task != "seq_cls":
        from trl import SFTTrainer

        return SFTTrainer(**kwargs)
    from transformers import DataCollatorWithPadding, Trainer

    length = recipe.training.get("max_length") or min(tokenizer.model_max_length,
                                                       getattr(model.config, "max_position_embeddings", 512))
    if recipe.dataset.pairs is None and train_dataset is not None:  # saved with the run: infer asks alike
        recipe.dataset.pairs = is_pair(next(iter(train_dataset), None) or {})
    train_dataset, eval_dataset = (None if d is None else encode_pairs(
        d, tokenizer, length, recipe.model.labels, recipe.dataset.path, recipe.dataset.pairs)
        for d in (train_dataset, eval_dataset))

    seen: tuple[list[int], list[int]] = ([], [])  # batch_eval_metrics: a batch a call, then compute_result

    def compute_metrics(eval_pred, compute_result: bool = True) -> dict[str, float] | None:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        for part in logits if isinstance(logits, list) else [logits]:  # a list: eval_do_concat_batches false
            seen[0].extend(part.argmax(-1).tolist())
        for part in labels if isinstance(labels, list) else [labels]:
            seen[1].extend(part.tolist())
        if not compute_result:
            return None
        metrics = classification_metrics(*seen, model.config.num_labels)
        seen[0].clear(), seen[1].clear()
        return metrics

    return Trainer(**{**kwargs, "train_dataset": train_dataset, "eval_dataset": eval_dataset},
                   data_collator=DataCollatorWithPadding(tokenizer),
                   compute_metrics=compute_metrics if eval_dataset is not None else None)


def avoid_cudnn_attention(recipe: Recipe) -> None:
    """Train sdpa on CUDA without cuDNN's attention kernel: it builds a plan for every new sequence length
    (~0.6 s of CPU, forward and backward), and padded batches (length-grouped by default) bring a new
    length nearly every step, which left an H100 idle 87% of a 1.5B LoRA step (bench/README.md, "GPU").
    PyTorch then picks flash or memory-efficient attention, which need no per-shape set-up."""
    import torch

    if torch.cuda.is_available() and recipe.model.attn_implementation == "sdpa":
        torch.backends.cuda.enable_cudnn_sdp(False)


def score_label_positions_only(args) -> None:
    """TRL's fused LM head scores only the positions that have a label on Triton devices, but every position
    elsewhere (prompt and padding too), to keep tile shapes fixed for compilers (Neuron). Eager CPU training
    compiles nothing: lora_ns lets it score label positions as well. Same loss and gradients
    (tests/test_speed_defaults.py); on GSM8K rows with a 49k vocabulary, 1.8x the tokens per CPU second
    (bench/README.md). TRL's private `_use_triton` decides; if a release renames it this does nothing."""
    import trl.trainer.utils as trl_utils

    decides = getattr(trl_utils, "_use_triton", None)
    if args.torch_compile or decides is None or getattr(decides, "lora_ns", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or decides(device)

    compact.lora_ns = True
    trl_utils._use_triton = compact


def selective_checkpointing_reaches(model, args) -> None:
    """TRL's ``gradient_checkpointing_kwargs: {selective: true}`` (the attention output saved, not recomputed)
    wraps the model SFTTrainer is given: under a peft adapter the PeftModel, which transformers 5.x passes by
    (it enables checkpointing on the base model), and the other trainers do not wrap at all; torch got the
    unknown key and training stopped at the first step. Wrap the transformers model, with TRL's function."""
    if args.gradient_checkpointing and (args.gradient_checkpointing_kwargs or {}).get("selective"):
        from trl.models import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model.get_base_model() if hasattr(model, "get_base_model")
                                                  else model)


def prepare(recipe: Recipe, args) -> tuple[Any, Any, tuple[int, int]]:
    """Load the model and data and build the trainer: (trainer, tokenizer, (trainable, total) parameters)."""
    from transformers import set_seed

    set_seed(args.seed)  # before peft creates (randomly initialised) adapter weights
    avoid_cudnn_attention(recipe)
    score_label_positions_only(args)
    with hub_errors(recipe, "tokenizer", tokenizer_field(recipe)):
        tokenizer = load_tokenizer(recipe)
    if (problem := eos_problem(recipe, tokenizer)) is not None:  # the nets for what validate could not reach
        raise UserError(problem)
    build = pretrain_datasets if recipe.task == "pretrain" else build_datasets  # preference rows too
    with args.main_process_first(desc="build the datasets"):  # first: a bad row fails before the weights load
        datasets = build(recipe, tokenizer)
    if recipe.task == "grpo":
        with trainer_errors(recipe):
            for rows in datasets:
                try_prompt_templates(tokenizer, rows)
    with hub_errors(recipe, "model", "model.name_or_path"):
        model = load_model(recipe, tokenizer)
    problem = vocabulary_problem(recipe, tokenizer, model.get_input_embeddings().num_embeddings)
    if problem is not None and problem.is_error:
        raise UserError(problem)
    model = apply_peft(model, recipe)
    selective_checkpointing_reaches(model, args)
    trainable, total = count_parameters(model)
    if args.process_index == 0:
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    with args.main_process_first(desc="tokenize the datasets"), trainer_errors(recipe, starting=True):
        trainer = build_trainer(recipe, args, model, tokenizer, *datasets)
    return trainer, tokenizer, (trainable, total)


@contextmanager
def hub_errors(recipe: Recipe, what: str, field: str) -> Iterator[None]:
    """A tokenizer or model validate could not reach (a Hub id, offline there; a gated or missing repo) that
    does not load here either, as one line."""
    try:
        yield
    except OSError as err:
        why = first_line(err, 300)
        fix = "check the id or path; offline (HF_HUB_OFFLINE), it must be in the HF cache"
        raise UserError(recipe.problem(field, f"cannot load the {what}: {why}", fix)) from None


@contextmanager
def disk_errors(recipe: Recipe) -> Iterator[None]:
    """A full disk (or quota, or a folder made read-only) while saving is one line naming the complete
    checkpoint a rerun resumes from (one cut off mid-save has no trainer_state.json and is skipped)."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = "No space left" in str(err) or "write failed" in str(err)  # torch.save's own wording
        if not full and not (isinstance(err, OSError) and err.errno in (
                errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)):
            raise
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        last = last_checkpoint(recipe.output_dir, quiet=True)
        fix = ("free disk space (or fix the folder's permissions) and rerun: it resumes "
               f"from {last}" if last else "free disk space and rerun")
        raise UserError(recipe.problem("training.output_dir", f"saving to {recipe.output_dir} failed: {why}",
                                       fix)) from None


@contextmanager
def trainer_errors(recipe: Recipe, starting: bool = False) -> Iterator[None]:
    """What the trainer raises that is the recipe's to fix, as one line: a conversation past validate's sample
    that the chat template refuses (`validate.tokens`); `starting` (the trainer is being built), a ValueError
    naming a key of the recipe's training section, its own check of that key (one validate does not repeat).
    Any other stays a traceback: it is not the recipe's to fix."""
    from jinja2 import TemplateError

    try:
        yield
    except TemplateError as err:
        raise UserError(recipe.problem("model.chat_template", f"the chat template refuses a conversation in "
                                       f"the data: {err}", "set model.chat_template to one that takes it, or "
                                       "fix those rows (validate names the first in its sample)")) from None
    except ValueError as err:
        if not (starting and named_keys(str(err), recipe.training)):
            raise
        problem = library_problem(recipe, "training", recipe.training, err, "the trainer's docs")
        raise UserError(problem) from None


@contextmanager
def stream_errors(recipe: Recipe) -> Iterator[None]:
    """Streamed data is parsed while training, past the rows validate read: a malformed row there stops the
    run as its file:line (the local files re-read strictly, only on this error path), not a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        frames = traceback.extract_tb(err.__traceback__)
        if recipe.dataset.streaming and any(f"{os.sep}datasets{os.sep}" in f.filename for f in frames):
            cfg = recipe.dataset
            read_every_row(source_for(cfg))
            if isinstance(cfg.val_split, str):
                read_every_row(source_for(cfg, cfg.val_split, "dataset.val_split"))
        raise


def run_training(recipe: Recipe, checks: Checks = Checks()) -> tuple[Any, dict[str, Any]]:
    """Set up (the same checks as validate), then load the weights, train and save; return the trainer (its
    model is the trained one) and the run summary."""
    started = time.time()
    ready = setup(recipe, dry_run=False, checks=checks)
    print_notes([n for n in ready.notes if n.severity == "warning"], PROG)
    with one_writer(recipe):
        return _train(recipe, ready, started)


def _train(recipe: Recipe, ready, started: float) -> tuple[Any, dict[str, Any]]:
    trainer, tokenizer, (trainable, total) = prepare(recipe, ready.args)
    checkpoint = resume_target(recipe)
    if (problem := resume_problem(recipe, trainer.model, checkpoint)) is not None and problem.is_error:
        raise UserError(problem)  # a warning was shown by setup's checks
    with disk_errors(recipe), stream_errors(recipe), trainer_errors(recipe):  # GRPO templates as it samples
        result = trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.state.global_step == 0:  # not one batch (fewer rows than one, with dataloader_drop_last)
            raise UserError(recipe.problem("training.per_device_train_batch_size", "no training step ran: "
                                           "the data gave no full batch", "add rows, lower it, or set "
                                           "training.dataloader_drop_last: false"))
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        evals = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
        summary = {"output_dir": recipe.output_dir, "task": recipe.task, "method": recipe.peft.method,
                   "steps": trainer.state.global_step, "seconds": round(time.time() - started, 1),
                   "train_loss": result.training_loss, "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "eval": evals[-1] if evals else None,
                   "trainable_params": trainable, "total_params": total}
        save_run(recipe, trainer, tokenizer, summary)
    return trainer, summary


def train(recipe: Recipe, checks: Checks = Checks()) -> dict[str, Any]:
    """Train a recipe (set-up checks first); return the run summary (also written to run_summary.json)."""
    return run_training(recipe, checks)[1]


def main(argv: list[str] | None = None) -> int:
    recipe, overrides = recipe_and_overrides(argv)
    train(load_recipe(recipe, overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
