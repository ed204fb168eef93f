"""What fails after training: every peft method with every task is trained two steps (saving a checkpoint
each step), then taken through the commands users run next: evaluate (on the hold-out and on a file of
rows), infer (a prompt, a file of rows, a checkpoint), merge, infer and evaluate on the merged model, a second
train run (in a new output_dir) that resumes the first's last checkpoint to a third step, and a third that
starts a new adapter from the first's (peft.init_from).

    python bench/sweep_after.py              # every case (~15 minutes on 2 CPU cores)
    python bench/sweep_after.py dpo:lora     # some of them, by task:method (quantized: task:4bit-lora)

Each step is `ok`, `refused` (a one-line error, exit 2: fine when it says why, e.g. merging prompt tuning)
or `crashed` (a traceback: a check to add, or a bug). Steps after a failed train are skipped.
`bench/sweep_combos.py` sweeps what passes validate and fails in training.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from lora_ns import evaluate, infer, merge, train  # noqa: E402
from lora_ns.data.sources import resolve_sample  # noqa: E402
from lora_ns.errors import run_cli  # noqa: E402
from sweep_combos import DATA, PEFT, base, merged  # noqa: E402  (bench/ is the script's folder)

PROMPT = {"seq_cls": ["--prompt", "The cat sat.", "--pair", "A cat was sitting."]}
# (name, task, method, recipe change): every method x task, then quantized bases (bitsandbytes runs on CPU)
CASES = [(method, task, method, {}) for task in DATA for method in PEFT] + [
    (f"{bits}bit-{method}", task, method, {"quantization": {f"load_in_{bits}bit": True}})
    for bits in (4, 8) for task in ("causal_lm", "seq_cls", "dpo", "grpo") for method in ("lora", "ia3")]


def step(module, argv: list[str]) -> tuple[str, str]:
    """(kind, why) of one command run in this process, its output kept out of the report."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_cli(module.PROG, lambda: module.main(argv))
    except Exception as exc:  # noqa: BLE001 - the point is to see them
        return "crashed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    lines = [line for line in err.getvalue().splitlines() if "error:" in line]
    return ("ok", "") if code == 0 else ("refused", lines[-1] if lines else f"exit {code}")


def flows(task: str, method: str, change: dict, work: Path) -> list[tuple[str, str, str]]:
    """Train, then each command after it, as (step, kind, why)."""
    recipe = merged(base(task, method, str(work / "run")), change)
    recipe["training"].update(save_strategy="steps", save_steps=1)
    recipe["dataset"]["val_split"] = 0.25
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = str(work / "run")
    ask = PROMPT.get(recipe["task"], ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4", "--greedy"])
    rows = work / f"rows{Path(resolve_sample(recipe['dataset']['path'])).suffix}"  # a few of the data's rows
    rows.write_text("".join(open(resolve_sample(recipe["dataset"]["path"]), encoding="utf-8").readlines()[:6]))
    steps = [("train", train, [str(work / "recipe.yaml")])]
    brief = ["--limit", "4", "--max-new-tokens", "4", "--no-progress"]
    adapter_or_model = ["--model", run] if method == "full" else ["--adapter", run]
    steps += [("evaluate", evaluate, [*adapter_or_model, *brief]),
              ("evaluate file", evaluate, [*adapter_or_model, "--data-file", str(rows), *brief,
                                           "--output-dir", str(work / "eval-file")]),
              ("infer", infer, ["--model", run, *ask, "--no-progress"]),
              ("infer file", infer, ["--model", run, "--input-file", str(rows), "--max-new-tokens", "4",
                                     "--output-file", str(work / "answers.jsonl"), "--no-progress"]),
              ("infer checkpoint", infer, ["--model", f"{run}/checkpoint-1", *ask, "--no-progress"])]
    if method != "full":
        steps += [("merge", merge, ["--adapter", run, "--output", str(work / "merged")]),
                  ("infer merged", infer, ["--model", str(work / "merged"), *ask, "--no-progress"]),
                  ("eval merged", evaluate, ["--model", str(work / "merged"), *brief])]
    again = [str(work / "recipe.yaml"), "training.max_steps=3"]
    steps.append(("resume", train, [*again, f"training.output_dir={work}/run2",
                                    f"training.resume_from_checkpoint={run}/checkpoint-2"]))
    if method != "full":
        steps.append(("init_from", train, [*again, f"training.output_dir={work}/run3", f"peft.init_from={run}"]))
    results = []
    for name, module, argv in steps:
        if name in ("infer merged", "eval merged") and results[-1][1] != "ok":
            continue
        results.append((name, *step(module, argv)))
        if name == "train" and results[-1][1] != "ok":
            break
    for i, (name, kind, _) in enumerate(results):
        state = work / "run2" / "checkpoint-3" / "trainer_state.json"
        if name == "resume" and kind == "ok" and (reached := json.loads(state.read_text())["global_step"]) != 3:
            results[i] = ("resume", "crashed", f"resumed to step {reached}, not 3")
    return results


def main(chosen: list[str]) -> None:
    counts: Counter = Counter()
    for case, task, method, change in CASES:
        if chosen and f"{task}:{case}" not in chosen:
            continue
        with tempfile.TemporaryDirectory() as work:
            for name, kind, why in flows(task, method, change, Path(work)):
                counts[kind] += 1
                if kind != "ok":
                    print(f"{task:9} {case:13} {name:12} {kind:8} {why[:150]}", flush=True)
        print(f"{task:9} {case:13} done", flush=True)
    print(json.dumps({"bench": "sweep_after", **counts}))


if __name__ == "__main__":
    main(sys.argv[1:])
