"""Benchmark: seconds to validate each recipe, as a user runs it (a fresh ``python -m lora_ns.validate``).

    python bench/validate.py                  # every recipes/*.yaml, 3 runs each, median wall time
    python bench/validate.py --runs 5 recipes/gsm8k.yaml
    python bench/validate.py --imports-only --runs 5   # quickstart vs `import torch, transformers, peft, trl`

Not a test. Each recipe is timed with the full checks and with ``--no-model``, ``--no-data`` and
both, so the cost of each check is visible. Runs offline (HF_HUB_OFFLINE=1, as on this machine;
``--online`` leaves the environment alone): recipes naming hub models or datasets then skip those
checks with a warning, so their figures show the offline path. Target: <= 3 s per recipe.
First, in the same run, quickstart's full validation and ``--no-model --no-data`` are timed against
a bare ``python -c "import torch, transformers, peft, trl"`` (targets: full at most +1 s over the
imports; ``--no-model --no-data`` under 1 s). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"full": [], "no-model": ["--no-model"], "no-data": ["--no-data"],
         "no-model+no-data": ["--no-model", "--no-data"]}
TARGET_S = 3.0
IMPORTS = "import torch, transformers, peft, trl"  # the floor any HF training script pays
# ... and with `datasets`, which SFTTrainer prepares every data set with (train and validate both need it)
DATA_IMPORTS = IMPORTS + ", datasets"
FLOOR_TARGET_S = 1.0  # full validate of quickstart: at most this much over the floor
FAST_TARGET_S = 1.0  # --no-model --no-data: under this


def time_command(cmd: list[str], env: dict[str, str], cpu: bool = False) -> tuple[float, int]:
    """Wall seconds (or with `cpu`, the child's user + system CPU seconds, which other jobs on a shared
    machine disturb far less) and the exit code of one process."""
    started, before = time.perf_counter(), os.times()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = os.times()
    cpu_s = after.children_user + after.children_system - before.children_user - before.children_system
    spent = cpu_s if cpu else time.perf_counter() - started
    return spent, proc.returncode


def against_imports(env: dict[str, str], runs: int, clocks: list[str]) -> dict[str, object]:
    """quickstart's full validation and its --no-model --no-data path vs the bare library imports, measured
    in turn in each run (so drift on a shared machine hits all three alike); per-run differences."""
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    commands = {"imports": [sys.executable, "-c", IMPORTS],
                "imports+datasets": [sys.executable, "-c", DATA_IMPORTS],
                "full": [sys.executable, "-m", "lora_ns.validate", recipe],
                "no-model+no-data": [sys.executable, "-m", "lora_ns.validate", recipe, "--no-model",
                                     "--no-data"]}
    out: dict[str, object] = {}
    for clock in clocks:
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, cmd in commands.items():
                seconds, code = time_command(cmd, env, cpu=clock == "cpu")
                if code:
                    raise SystemExit(f"{' '.join(cmd[1:])} exited {code}")
                times[name].append(seconds)
        extra = [f - i for f, i in zip(times["full"], times["imports"])]
        extra_data = [f - i for f, i in zip(times["full"], times["imports+datasets"])]
        ratio = [f / i for f, i in zip(times["full"], times["imports"])]
        out[clock] = {"imports_s": round(statistics.median(times["imports"]), 2),
                      "full_s": round(statistics.median(times["full"]), 2),
                      "full_minus_imports_s": round(statistics.median(extra), 2),
                      "imports_datasets_s": round(statistics.median(times["imports+datasets"]), 2),
                      "full_minus_imports_datasets_s": round(statistics.median(extra_data), 2),
                      "full_over_imports": round(statistics.median(ratio), 2),
                      "no_model_no_data_s": round(statistics.median(times["no-model+no-data"]), 2),
                      "per_run": {name: [round(t, 2) for t in ts] for name, ts in times.items()}}
    return out


def print_against_imports(floor: dict[str, dict]) -> None:
    for clock, f in floor.items():
        extra, fast = f["full_minus_imports_s"], f["no_model_no_data_s"]
        print(f"[{clock} s] quickstart full: {f['full_s']:.2f} vs `{IMPORTS}`: {f['imports_s']:.2f} -> "
              f"x{f['full_over_imports']:.2f}, {extra:+.2f} s (target <= +{FLOOR_TARGET_S:.0f} s): "
              f"{'OK' if extra <= FLOOR_TARGET_S else 'OVER'}; --no-model --no-data: {fast:.2f} "
              f"(target < {FAST_TARGET_S:.0f} s): {'OK' if fast < FAST_TARGET_S else 'OVER'}")
        print(f"  with datasets imported too (`{DATA_IMPORTS}`: {f['imports_datasets_s']:.2f}): "
              f"{f['full_minus_imports_datasets_s']:+.2f} s")
        print(f"  per run: {json.dumps(f['per_run'])}")


def time_validate(recipe: Path, flags: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and exit code of one ``python -m lora_ns.validate`` process."""
    return time_command([sys.executable, "-m", "lora_ns.validate", str(recipe), *flags], env)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/validate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default: recipes/*.yaml)")
    parser.add_argument("--runs", type=int, default=3, help="runs per recipe and mode (median reported)")
    parser.add_argument("--imports-only", action="store_true",
                        help="only quickstart (full, and --no-model --no-data) vs the bare library imports")
    parser.add_argument("--clock", choices=["wall", "cpu", "both"], default="both",
                        help="for the imports comparison: wall seconds, the child's CPU seconds, or both")
    parser.add_argument("--online", action="store_true", help="do not set HF_HUB_OFFLINE=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    recipes = args.recipes or sorted((REPO / "recipes").glob("*.yaml"))
    env = dict(os.environ)
    if not args.online:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Warm-up: builtin models are built on first use; that one-off cost is not what we measure.
    time_validate(REPO / "recipes" / "quickstart.yaml", [], env)
    floor = against_imports(env, args.runs, ["wall", "cpu"] if args.clock == "both" else [args.clock])
    print_against_imports(floor)
    if args.imports_only:
        print(json.dumps({"bench": "validate", "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                          "load_average": round(os.getloadavg()[0], 1), "quickstart_vs_imports": floor}))
        return 0
    results: dict[str, dict[str, dict[str, float | int]]] = {}
    for recipe in recipes:
        name = recipe.stem
        results[name] = {}
        for mode, flags in MODES.items():
            timings = [time_validate(recipe, flags, env) for _ in range(args.runs)]
            results[name][mode] = {"median_s": round(statistics.median(t for t, _ in timings), 2),
                                   "max_s": round(max(t for t, _ in timings), 2), "exit_code": timings[-1][1]}
            print(f"  {name} {mode}: {results[name][mode]['median_s']:.2f} s", file=sys.stderr, flush=True)
    width = max(len(n) for n in results)
    print(f"{'recipe':<{width}} | " + " | ".join(f"{m:>16}" for m in MODES) + " | exit")
    for name, modes in results.items():
        cells = [f"{modes[m]['median_s']:>14.2f} s" for m in MODES]
        print(f"{name:<{width}} | " + " | ".join(cells) + f" | {modes['full']['exit_code']}")
    worst = max(modes["full"]["median_s"] for modes in results.values())
    verdict = "OK" if worst <= TARGET_S else "OVER"
    print(f"slowest full validation: {worst:.2f} s (target <= {TARGET_S:.0f} s): {verdict}")
    print(json.dumps({"bench": "validate", "date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(),
                      "offline": not args.online, "runs": args.runs, "target_s": TARGET_S,
                      "slowest_full_s": worst, "load_average": round(os.getloadavg()[0], 1),
                      "quickstart_vs_imports": floor, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
