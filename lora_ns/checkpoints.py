"""Output directories and checkpoints: never clobber a finished run, resume where a run stopped."""

from __future__ import annotations

from pathlib import Path

from lora_ns.config import Recipe
from lora_ns.errors import UserError

FINISHED_MARKER = "run_summary.json"  # written last by lora_ns.train


def guard_output_dir(recipe: Recipe) -> None:
    """Refuse to train into an output_dir that holds a finished run, unless the recipe allows it."""
    out = Path(recipe.output_dir)
    if (out / FINISHED_MARKER).exists() and not recipe.training.get("overwrite_output_dir"):
        raise UserError(recipe.problem(
            "training.output_dir", f"{out} already holds a finished run",
            "choose another output_dir, or set training.overwrite_output_dir: true"))


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` folder in output_dir, or None."""
    folder = Path(output_dir)
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-")[1].isdigit()] if folder.is_dir() else []
    return str(max(steps)[1]) if steps else None


def resume_target(recipe: Recipe) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets: "auto" (default) finds the last checkpoint."""
    wanted = recipe.training.get("resume_from_checkpoint", "auto")
    if wanted in (None, False, "none", "no"):
        return None
    if wanted in ("auto", True, "true", "last"):
        return last_checkpoint(recipe.output_dir)
    if not Path(str(wanted)).is_dir():
        raise UserError(recipe.problem("training.resume_from_checkpoint", f"checkpoint {wanted} not found",
                                       "point it at a checkpoint-<step> folder, or use auto"))
    return str(wanted)
