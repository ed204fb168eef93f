"""End-of-training report: a loss-curve PNG and a short human summary in the output dir.

`write_report` is called by `lora_ns.train` on the main process after the model is saved and before
``run_summary.json`` marks the run finished. It writes ``loss_curve.png`` (train and eval loss against
the step) and ``summary.txt`` (also printed): steps, time, losses, trainable parameters, where the
adapter is, and the commands to run next with the real paths. Both files are written atomically.
The plot uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global
backend (no display needed, nothing changed for a caller that uses pyplot itself).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from lora_ns.fileio import atomic_output

Points = list[tuple[int, float]]
CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "summary.txt"


def loss_points(log_history: list[dict[str, Any]]) -> tuple[Points, Points]:
    """(train, eval) lists of (step, loss) from a Trainer's ``state.log_history``."""
    train = [(int(e.get("step", i)), float(e["loss"])) for i, e in enumerate(log_history) if "loss" in e]
    evals = [(int(e.get("step", i)), float(e["eval_loss"])) for i, e in enumerate(log_history) if "eval_loss" in e]
    return train, evals


def plot_loss_curve(train: Points, evals: Points, path: Path, title: str = "") -> None:
    """Draw train (line) and eval (line with markers) loss against the step into a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png")


def next_commands(output_dir: Path) -> list[tuple[str, str]]:
    """(what, command) pairs for what to do with a finished run, with the real paths."""
    out = shlex.quote(str(output_dir))
    recipe = shlex.quote(str(output_dir / "recipe.yaml"))
    has_adapter = (output_dir / "adapter_config.json").is_file()
    model_flag = "--adapter" if has_adapter else "--model"
    steps = [("try it", f'python -m lora_ns.infer --model {out} --prompt "Your question here"'),
             ("evaluate it", f"python -m lora_ns.evaluate {recipe} {model_flag} {out}")]
    if has_adapter:
        merged = shlex.quote(str(output_dir.parent / f"{output_dir.name}-merged"))
        steps.append(("merge it", f"python -m lora_ns.merge --adapter {out} --output {merged}"))
    return steps


def _fmt_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _fmt_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def summary_text(train: Points, evals: Points, output_dir: Path, summary: dict[str, Any], curve: str) -> str:
    """The human summary: a few aligned lines, then the next commands. `curve`: the PNG's path or why none."""
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    params = f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)" if trainable and total else "-"
    first = summary.get("first_loss", train[0][1] if train else None)
    last = summary.get("last_loss", train[-1][1] if train else None)
    kind = "adapter" if (output_dir / "adapter_config.json").is_file() else "model"
    rows = [
        ("steps", str(summary.get("steps", train[-1][0] if train else "-"))),
        ("time", _fmt_seconds(summary.get("seconds"))),
        ("train loss", f"{_fmt_loss(first)} -> {_fmt_loss(last)} (first -> last logged)"),
        ("eval loss", f"{_fmt_loss(evals[-1][1])} at step {evals[-1][0]}" if evals else "- (no evaluation ran)"),
        ("trainable params", params),
        (kind, str(output_dir)),
        ("loss curve", curve),
    ]
    width = max(len(name) for name, _ in rows)
    lines = ["Training finished.", *(f"  {name + ':':<{width + 1}} {value}" for name, value in rows), "", "Next:"]
    commands = next_commands(output_dir)
    what_width = max(len(what) for what, _ in commands)
    lines += [f"  {what + ':':<{what_width + 1}} {cmd}" for what, cmd in commands]
    return "\n".join(lines) + "\n"


def write_report(log_history: list[dict[str, Any]], output_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write ``loss_curve.png`` and ``summary.txt`` into `output_dir` and print the summary."""
    out = Path(output_dir)
    train, evals = loss_points(log_history)
    curve = "not drawn: no loss was logged (set training.logging_steps below the number of steps)"
    if train or evals:
        try:
            plot_loss_curve(train, evals, out / CURVE_FILE, title=f"loss — {out.name}")
            curve = str(out / CURVE_FILE)
        except Exception as err:  # a plot is not worth losing a finished run over: the adapter is saved
            curve = f"not drawn: {type(err).__name__}: {err}"
            print(f"lora_ns.report: warning: loss curve {curve}", file=sys.stderr)
    text = summary_text(train, evals, out, summary, curve)
    with atomic_output(out / SUMMARY_FILE, "w") as fh:
        fh.write(text)
    print(text, end="")
