"""Output directories and checkpoints: never clobber a finished run, resume where a run stopped.

An output_dir is in one of three states:

- empty or missing: a fresh run;
- interrupted: ``checkpoint-<step>`` folders but no ``run_summary.json`` (killed, preempted, out of
  memory): with ``resume_from_checkpoint: auto`` (the default) the run continues from the newest
  *complete* checkpoint, and Trainer restores the optimizer, scheduler and RNG state from it;
- finished: ``run_summary.json`` (written last by lora_ns.train): refused unless the recipe says
  ``training.overwrite_output_dir: true``, in which case it starts over: the old run's marker and
  checkpoints are removed first, so that if the new run is interrupted in turn, "auto" resumes it
  and not the old one.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError

FINISHED_MARKER = "run_summary.json"  # written last by lora_ns.train
# Trainer writes the weights, optimizer, scheduler and RNG state first and this file last, so a
# checkpoint folder without it was cut off mid-save and cannot be resumed from.
COMPLETE_MARKER = "trainer_state.json"
AUTO = ("auto", "true", "last")  # resume_from_checkpoint values that mean "the newest one"
NEVER = ("none", "no", "false")


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / FINISHED_MARKER).exists()


def guard_output_dir(recipe: Recipe) -> None:
    """Refuse to train into an output_dir that holds a finished run, unless the recipe allows it."""
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(recipe.problem("training.output_dir", f"{out} is a file, not a folder",
                                       "choose another output_dir"))
    if not is_finished(out):
        return
    if not recipe.training.get("overwrite_output_dir"):
        raise UserError(recipe.problem(
            "training.output_dir", f"{out} already holds a finished run",
            "choose another output_dir, or set training.overwrite_output_dir: true"))
    if os.environ.get("RANK", "0") == "0":  # the other ranks see the result after the datasets barrier
        _say(f"overwriting the finished run in {out}")
        for folder in checkpoints(out, complete_only=False):
            shutil.rmtree(folder)
        (out / FINISHED_MARKER).unlink()


def _step(path: Path) -> int | None:
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == "checkpoint" and step.isdigit() and path.is_dir() else None


def checkpoints(output_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """``checkpoint-<step>`` folders in output_dir, oldest step first (numeric, so 10 comes after 9)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = sorted((step, p) for p in folder.iterdir() if (step := _step(p)) is not None)
    return [p for _, p in found if not complete_only or (p / COMPLETE_MARKER).is_file()]


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` folder in output_dir, or None."""
    found = checkpoints(output_dir)
    return str(found[-1]) if found else None


def _say(message: str) -> None:
    """Print once per machine (every DDP rank calls resume_target)."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        print(f"lora_ns: {message}", file=sys.stderr)


def _wanted(recipe: Recipe) -> str | None:
    """The recipe's resume_from_checkpoint as "auto", a path, or None (never resume)."""
    wanted = recipe.training.get("resume_from_checkpoint", "auto")
    word = str(wanted).lower()
    if wanted is None or wanted is False or word in NEVER:
        return None
    return "auto" if wanted is True or word in AUTO else str(wanted)


def checkpoint_problem(recipe: Recipe) -> Problem | None:
    """What is wrong with an explicit resume_from_checkpoint path, if anything (also a validate rule)."""
    wanted = _wanted(recipe)
    if wanted in (None, "auto"):
        return None
    field, path = "training.resume_from_checkpoint", Path(wanted)
    if not path.is_dir():
        return recipe.problem(field, f"checkpoint {wanted} not found",
                              "point it at a checkpoint-<step> folder, or use auto")
    if not (path / COMPLETE_MARKER).is_file():
        return recipe.problem(field, f"{wanted} has no {COMPLETE_MARKER} (not a checkpoint, or cut off mid-save)",
                              "point it at a complete checkpoint-<step> folder, or use auto")
    return None


def resume_target(recipe: Recipe) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets.

    "auto" (the default) is the newest complete checkpoint of an interrupted run, or None for a fresh
    run or one that overwrites a finished run; an explicit path must be a complete checkpoint folder.
    """
    wanted = _wanted(recipe)
    if wanted is None:
        return None
    if wanted == "auto":
        if is_finished(recipe.output_dir):  # overwrite_output_dir: start over, don't "resume" a done run
            return None
        found = last_checkpoint(recipe.output_dir)
    else:
        problem = checkpoint_problem(recipe)
        if problem:
            raise UserError(problem)
        found = wanted
    if found:
        _say(f"resuming from {found}")
    return found
