"""Benchmark: seconds to validate each recipe, as a user runs it (a fresh ``python -m lora_ns.validate``).

    python bench/validate.py                  # every recipes/*.yaml, 3 runs each, median wall time
    python bench/validate.py --runs 5 recipes/gsm8k.yaml

Not a test. Each recipe is timed with the full checks and with ``--no-model``, ``--no-data`` and
both, so the cost of each check is visible. Runs offline (HF_HUB_OFFLINE=1, as on this machine;
``--online`` leaves the environment alone): recipes naming hub models or datasets then skip those
checks with a warning, so their figures show the offline path. Target: <= 3 s per recipe.
Prints a table and one JSON line.
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


def time_validate(recipe: Path, flags: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and exit code of one ``python -m lora_ns.validate`` process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lora_ns.validate", str(recipe), *flags], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started, proc.returncode


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/validate.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path, help="recipe files (default: recipes/*.yaml)")
    parser.add_argument("--runs", type=int, default=3, help="runs per recipe and mode (median reported)")
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
                      "slowest_full_s": worst, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
