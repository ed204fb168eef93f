"""What fails only with several processes: every peft method with every task trained two steps by two DDP
ranks on the CPU (gloo), launched as users launch on GPUs (examples/train_multi_gpu.sh, which validates the
recipe against the accelerate config first), with a checkpoint saved at the end.

    python bench/sweep_ddp.py               # every case (~25 minutes on 2 CPU cores)
    python bench/sweep_ddp.py grpo:lora     # some of them, by task:method

A case is `ok`, `refused` (a one-line error, exit 2) or `crashed` (a traceback: a check to add, or a bug).
bench/sweep_after.py runs the same cases in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from sweep_combos import DATA, PEFT, base  # bench/ is the script's folder

REPO = Path(__file__).resolve().parent.parent


def launched(task: str, method: str, work: Path) -> tuple[str, str]:
    """(kind, why) of a two-rank run of the case."""
    recipe = base(task, method, str(work / "run"))
    recipe["training"].update(save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
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
        state = json.loads((work / "run" / "checkpoint-2" / "trainer_state.json").read_text())
        return ("ok", "") if state["global_step"] == 2 else ("crashed", f"step {state['global_step']}, not 2")
    if "Traceback" not in done.stderr and errors:
        return "refused", errors[-1]
    return "crashed", (errors or done.stderr.splitlines() or ["(no output)"])[-1]


def main(chosen: list[str]) -> None:
    counts: Counter = Counter()
    for task in DATA:
        for method in PEFT:
            if chosen and f"{task}:{method}" not in chosen:
                continue
            with tempfile.TemporaryDirectory() as work:
                kind, why = launched(task, method, Path(work))
            counts[kind] += 1
            print(f"{task:9} {method:13} {kind:8} {why[:160]}", flush=True)
    print(json.dumps({"bench": "sweep_ddp", **counts}))


if __name__ == "__main__":
    main(sys.argv[1:])
