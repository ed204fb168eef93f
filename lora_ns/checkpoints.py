"""Output directories and checkpoints: never clobber a finished run, resume where a run stopped.

An output_dir is in one of three states:

- empty or missing: a fresh run (a folder holding anything else, e.g. ``output_dir: .`` in a project, is
  refused unless ``training.overwrite_output_dir: true``: training would overwrite the user's files);
- interrupted: ``checkpoint-<step>`` folders but no ``run_summary.json`` (killed, preempted, out of
  memory): with ``resume_from_checkpoint: auto`` (the default) the run continues from the newest
  *complete* checkpoint (its trainer_state.json present and its weights/optimizer files whole; a damaged
  newer one is skipped, and said so), and Trainer restores the optimizer, scheduler and RNG state from it;
- finished: ``run_summary.json`` (written last by lora_ns.train): refused unless the recipe says
  ``training.overwrite_output_dir: true``, in which case it starts over: the old run's marker and
  checkpoints are removed first, so that if the new run is interrupted in turn, "auto" resumes it
  and not the old one.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def is_run_folder(folder: Path) -> bool:
    """Something lora_ns (or Trainer) wrote: a finished run, checkpoints, or TensorBoard logs."""
    return is_finished(folder) or (folder / "runs").is_dir() or bool(checkpoints(folder, complete_only=False))


def _foreign_files(folder: Path) -> list[str]:
    """Files in a folder that is not a lora_ns run (hidden files ignored): training there would overwrite them."""
    if not folder.is_dir() or is_run_folder(folder):
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def output_dir_problem(recipe: Recipe) -> Problem | None:
    """An output_dir that cannot be written, or that holds someone else's files (unless the recipe sets
    training.overwrite_output_dir: true); checked before anything loads, by validate and train alike."""
    from lora_ns.fileio import unwritable

    out, field = Path(recipe.output_dir), "training.output_dir"
    if out.exists() and not out.is_dir():
        return recipe.problem(field, f"{out} is a file, not a folder", "choose another output_dir")
    if why := unwritable(out):
        return recipe.problem(field, why, "choose an output_dir you can write to")
    if (files := _foreign_files(out)) and not recipe.training.get("overwrite_output_dir"):
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        return recipe.problem(
            field, f"{out} already holds files that are not a lora_ns run ({shown}); training would overwrite them",
            "choose a new or empty output_dir, or set training.overwrite_output_dir: true")
    return None


def guard_output_dir(recipe: Recipe) -> None:
    """Refuse an unusable output_dir (`output_dir_problem`) or one that holds a finished run, unless the
    recipe allows overwriting it."""
    if problem := output_dir_problem(recipe):
        raise UserError(problem)
    out = Path(recipe.output_dir)
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


def safetensors_defect(path: Path) -> str | None:
    """Why a .safetensors file is not whole (bad header, or shorter/longer than its header says), or None."""
    import json
    import struct

    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length)) if length < path.stat().st_size else None
    except (OSError, ValueError, struct.error):
        header = None
    if not isinstance(header, dict):
        return f"{path.name} has no valid safetensors header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) != path.stat().st_size:
        return f"{path.name} is truncated ({path.stat().st_size} bytes, its header says {8 + length + max(ends)})"
    return None


def checkpoint_defect(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from: no trainer_state.json (cut off mid-save), or a weights,
    optimizer or scheduler file that is not whole. Reads headers and zip indexes only, never unpickles."""
    import json
    import zipfile

    try:
        json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {COMPLETE_MARKER} (cut off mid-save)"
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors" and (why := safetensors_defect(file)):
            return why
        if file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):  # torch.save writes a zip
            return f"{file.name} is truncated or not a torch file"
    return None


def last_checkpoint(output_dir: str | Path, say: bool = True) -> str | None:
    """The newest ``checkpoint-<step>`` folder in output_dir whose files are whole, or None; each newer
    one skipped is named with the reason."""
    for folder in reversed(checkpoints(output_dir, complete_only=False)):
        if not (why := checkpoint_defect(folder)):
            return str(folder)
        if say:
            _say(f"skipping {folder}: {why}")
    return None


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
    if why := checkpoint_defect(path):
        return recipe.problem(field, f"cannot resume from {wanted}: {why}",
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


# Why a save can fail that the user, not the code, has to fix.
_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextmanager
def disk_errors(recipe: Recipe) -> Iterator[None]:
    """A full disk (or quota, or a folder made read-only) while training saves is one line that says which
    complete checkpoint a rerun resumes from; Trainer writes trainer_state.json last, so a checkpoint cut off
    mid-save is never resumed and the one before it stays."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        full = "No space left" in str(err) or "write failed" in str(err)  # torch.save's own wording
        if not (isinstance(err, OSError) and err.errno in _DISK_ERRORS) and not full:
            raise
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        last = last_checkpoint(recipe.output_dir, say=False)
        raise UserError(recipe.problem("training.output_dir", f"saving to {recipe.output_dir} failed: {why}",
                                       "free disk space (or fix the folder's permissions) and rerun: it resumes "
                                       f"from {last}" if last else "free disk space and rerun")) from None
