"""What fails only with several processes: every peft method with every task trained two steps by two DDP
ranks on the CPU (gloo), launched as users launch on GPUs (examples/train_multi_gpu.sh, which validates the
recipe against the accelerate config first), with a checkpoint saved at the end.

    python bench/sweep_ddp.py               # every case (~30 minutes on 2 CPU cores)
    python bench/sweep_ddp.py grpo:lora     # some of them, by task:method (or task:eval, :streaming, :resume, ...)

A case is `ok`, `refused` (a one-line error, exit 2) or `crashed` (a traceback: a check to add, or a bug).
bench/sweep_after.py runs the same cases in one process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from sweep_combos import DATA, EVAL, PEFT, base, merged  # bench/ is the script's folder

REPO = Path(__file__).resolve().parent.parent
# (name, task, method, recipe change): every method x task, then each task with a hold-out evaluated every
# step, streamed data (also with a hold-out), resumed from the first run's checkpoint by a second two-rank run,
# gradient checkpointing, and a 4-bit base
CASES = [(method, task, method, {}) for task in DATA for method in PEFT] + [
    (name, task, "lora", change) for task in DATA for name, change in (
        ("eval", EVAL), ("streaming", {"dataset": {"streaming": True}}),
        ("stream+eval", merged({"dataset": {"streaming": True}}, copy.deepcopy(EVAL))), ("resume", {}),
        ("checkpointing", {"training": {"gradient_checkpointing": True}}),
        ("4bit", {"quantization": {"load_in_4bit": True}}))]


def launched(task: str, method: str, change: dict, work: Path, steps: int = 2) -> tuple[str, str]:
    """(kind, why) of a two-rank run of the case."""
    recipe = merged(base(task, method, str(work / "run")), change)
    recipe["training"].update(save_strategy="steps", save_steps=1, per_device_train_batch_size=2, max_steps=steps)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHON": sys.executable, "CPU_PROCESSES": "2", "MAIN_PROCESS_PORT": "0",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(["bash", str(REPO / "examples" / "train_multi_gpu.sh"), str(work / "recipe.yaml")],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "crashed", "no end within 10 minutes (a rank waiting on the other?)"
    errors = [line for line in done.stderr.splitlines() if "Error" in line or "error:" in line]
    if done.returncode == 0:
        out = Path(recipe["training"]["output_dir"])
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        return ("ok", "") if state["global_step"] == steps else ("crashed", f"step {state['global_step']}")
    if "Traceback" not in done.stderr and errors:
        return "refused", errors[-1]
    return "crashed", (errors or done.stderr.splitlines() or ["(no output)"])[-1]


def main(chosen: list[str]) -> None:
    counts: Counter = Counter()
    for case, task, method, change in CASES:
        if chosen and f"{task}:{case}" not in chosen:
            continue
        with tempfile.TemporaryDirectory() as work:
            kind, why = launched(task, method, change, Path(work))
            if case == "resume" and kind == "ok":  # the finished run, resumed to a third step
                change = {"training": {"resume_from_checkpoint": f"{work}/run/checkpoint-2",
                                       "output_dir": f"{work}/run2"}}
                kind, why = launched(task, method, change, Path(work), steps=3)
        counts[kind] += 1
        print(f"{task:9} {case:13} {kind:8} {why[:160]}", flush=True)
    print(json.dumps({"bench": "sweep_ddp", **counts}))


if __name__ == "__main__":
    main(sys.argv[1:])
