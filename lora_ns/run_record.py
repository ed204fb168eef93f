"""What a finished run leaves beside its weights: the resolved recipe (credentials removed), library versions,
the trainer state, ``summary.txt`` and ``loss_curve.png`` (also printed, with the commands to run next), and
``run_summary.json`` last, which marks the run finished. Only the main process writes.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from contextlib import suppress
from pathlib import Path
from typing import Any

from lora_ns.checkpoints import FINISHED_MARKER, RECIPE_FILE, is_adapter_dir
from lora_ns.config import Recipe, load_recipe
from lora_ns.errors import program
from lora_ns.fileio import atomic_output, write_text_atomic
from lora_ns.model import dtype_name

PROG = "lora_ns.train"  # the command whose runs this records

# --- credentials: refused in a recipe (validate.rules), never written to a saved one ------------------

SECRET_KEY_WORDS = ("token", "secret", "password", "api_key")
# Known token shapes (Hugging Face, OpenAI, GitHub, Slack, AWS), or a long opaque run of letters and digits.
_SECRET_SHAPES = re.compile(r"^(hf_|sk-|ghp_|gho_|ghs_|github_pat_|xox[abp]-|AKIA)[A-Za-z0-9_\-]{8,}$")
_OPAQUE = re.compile(r"^(?=.*[0-9])(?=.*[A-Za-z])[A-Za-z0-9_\-]{32,}$")


def looks_like_secret(value: Any) -> bool:
    text = value.strip() if isinstance(value, str) else ""
    return bool(_SECRET_SHAPES.match(text) or _OPAQUE.match(text))


def is_secret(key: str, value: Any) -> bool:
    """A set hub_token, or a token-shaped value under a credential's name (eos_token "<|im_end|>" is none)."""
    name = key.lower()
    return (name == "hub_token" and bool(value)) or (any(w in name for w in SECRET_KEY_WORDS)
                                                     and looks_like_secret(value))


def saved_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, credentials removed, "auto" dtypes pinned to what this run used (so a
    later merge or evaluation reproduces the training precision, e.g. QLoRA's requantization)."""
    clean = recipe.model_copy(deep=True)
    clean.training = {k: v for k, v in recipe.training.items() if not is_secret(k, v)}
    if clean.model.dtype == "auto":
        clean.model.dtype = dtype_name(recipe.model.dtype)
    if clean.quantization.bnb_4bit_compute_dtype == "auto":
        clean.quantization.bnb_4bit_compute_dtype = clean.model.dtype
    return clean.to_yaml()


def save_run(recipe: Recipe, trainer, tokenizer, summary: dict[str, Any]) -> None:
    """Adapter (or full model) as safetensors, trainer state, and the run record; run_summary.json last."""
    from importlib.metadata import PackageNotFoundError, version

    out = Path(recipe.output_dir)
    trainer.save_model(str(out))
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    tokenizer.save_pretrained(str(out))
    write_text_atomic(out / RECIPE_FILE, saved_recipe(recipe))
    versions = {}
    for name in ("lora_ns", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        with suppress(PackageNotFoundError):
            versions[name] = version(name)
    write_text_atomic(out / "versions.json", json.dumps(versions, indent=2))
    write_report(trainer.state.log_history, out, summary)
    write_text_atomic(out / FINISHED_MARKER, json.dumps(summary, indent=2))  # last: marks a finished run


def loss_points(log_history: list[dict[str, Any]]) -> tuple[list, list]:
    """(train, eval) lists of (step, loss) from a Trainer's ``state.log_history``."""
    return tuple([(int(e.get("step", i)), float(e[key])) for i, e in enumerate(log_history) if key in e]
                 for key in ("loss", "eval_loss"))


def plot_loss_curve(train: list, evals: list, path: Path, title: str) -> None:
    """Train and eval loss against the step, as a PNG. matplotlib's object API (savefig picks the Agg canvas
    for a PNG): pyplot's global backend is never touched (no display needed, nothing changed for users)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot(xlabel="step", ylabel="loss", title=title)
    for points, style, label in ((train, "-", "train loss"), (evals, "o-", "eval loss")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png")


def next_commands(output_dir: Path) -> list[tuple[str, str]]:
    """(what, command) pairs for what to do with a finished run, with the real paths."""
    saved = output_dir / RECIPE_FILE
    out, recipe = shlex.quote(str(output_dir)), shlex.quote(str(saved))
    adapter = is_adapter_dir(output_dir)
    weights = "--adapter" if adapter else "--model"
    # evaluate's rows: the run's held-out split, else a file of them
    rows = "" if saved.is_file() and load_recipe(saved).dataset.val_split else " --data-file HELD_OUT.jsonl"
    steps = [("try it", f'python -m lora_ns.infer --model {out} --prompt "Your question here"'),
             ("evaluate it", f"python -m lora_ns.evaluate {recipe} {weights} {out}{rows}")]
    merged = shlex.quote(str(output_dir.parent / f"{output_dir.name}-merged"))
    return steps + [("merge it", f"python -m lora_ns.merge --adapter {out} --output {merged}")] * adapter


def next_lines(output_dir: Path) -> list[str]:
    """The "Next:" block that ends a run's summary (and the quick start's output)."""
    return ["Next:", *(f"  {what + ':':<12} {cmd}" for what, cmd in next_commands(output_dir))]


def write_report(log_history: list[dict[str, Any]], output_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``loss_curve.png`` and ``summary.txt`` (also printed: steps, time, losses, parameters, where the
    weights are, the commands to run next) into `output_dir`, each atomically."""
    out = Path(output_dir)
    train, evals = loss_points(log_history)
    curve = "not drawn: no loss was logged (set training.logging_steps below the number of steps)"
    if train or evals:
        try:
            plot_loss_curve(train, evals, out / "loss_curve.png", f"loss — {out.name}")
            curve = str(out / "loss_curve.png")
        except Exception as err:  # a plot is not worth losing a finished run over: the weights are saved
            curve = ("not drawn: matplotlib is not installed (pip install 'lora_ns[plot]')"
                     if isinstance(err, ImportError) else f"not drawn: {type(err).__name__}: {err}")
            print(f"{program(PROG)}: warning: loss curve {curve}", file=sys.stderr)
    kind = "adapter" if is_adapter_dir(out) else "model"
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    minutes, seconds = divmod(float(summary.get("seconds", 0)), 60)
    rows = {"steps": summary.get("steps", "-"),
            "time": f"{int(minutes)} min {seconds:.0f} s" if minutes else f"{seconds:.1f} s",
            "train loss": " -> ".join("-" if summary.get(k) is None else f"{summary[k]:.4f}"
                                      for k in ("first_loss", "last_loss")) + " (first -> last logged)"
            if summary.get("first_loss") is not None or summary.get("train_loss") is None
            else f"{summary['train_loss']:.4f} (the run's mean: no step logged, logging_steps > steps)",
            "eval loss": f"{evals[-1][1]:.4f} at step {evals[-1][0]}" if evals else "- (no evaluation ran)",
            "trainable params": f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" if total
            else "-",
            kind: out, "loss curve": curve}
    lines = [f"Training finished: {kind} saved to {out}", *(f"  {k + ':':<17} {v}" for k, v in rows.items()),
             "", *next_lines(out)]
    with atomic_output(out / "summary.txt", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
