"""``python -m lora_ns.validate RECIPE.yaml [overrides]`` or ``--all [DIR]``: check recipes before training.

Checks the schema (unknown keys with the closest valid one, types), then runs train's own set-up
(`lora_ns.setup`) in dry-run: the rules, the real training arguments and peft config, the model on the
meta device, a data sample through the tokenizer. Needs no model weights and no network. Prints one
line per problem; exits 0 when every recipe is clean (warnings allowed), 2 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_ns.command_line import CommandParser
from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.setup import Checks, check_recipe_file

PROG = "lora_ns.validate"
RECIPES_DIR = Path("recipes")


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m lora_ns.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="recipe YAML to check")
    parser.add_argument("--all", nargs="?", const=str(RECIPES_DIR), metavar="DIR",
                        help="check every *.yaml in DIR (default: recipes/)")
    parser.add_argument("--no-data", action="store_true", help="skip reading a sample of the dataset")
    parser.add_argument("--no-model", action="store_true", help="skip loading the model config (meta device)")
    parser.add_argument("--accelerate-config", metavar="YAML",
                        help="also check the recipe against this accelerate config (DeepSpeed/FSDP combinations)")
    parser.add_argument("--show-sample", nargs="?", type=int, const=3, metavar="N",
                        help="print N (default 3) training examples as train sees them, loss tokens marked")
    parser.add_argument("--gpu-memory", metavar="SIZE", type=memory_size,
                        help="print the per-GPU memory estimate and warn when it is over 90%% of SIZE (24GiB, 80GB)")
    return parser


def memory_size(text: str) -> int:
    """'24GiB', '80GB', '24g' or a plain number of bytes -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
             "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
    number = text.strip().lower().rstrip("bigkmt ")
    unit = text.strip().lower()[len(number):].strip()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 24GiB, 80GB)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory size must be positive")
    return int(value)


def visible_gpu_memory() -> int | None:
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def memory_report(recipe: Recipe, accelerate_config: str | None, gpu_bytes: int | None) -> list[str]:
    """The per-GPU estimate (lora_ns.memory) for this launch, and a warning line when it will not fit."""
    from lora_ns.memory import estimate_for_recipe

    processes, strategy = 1, None
    if accelerate_config:
        from lora_ns.validate.launch import read_launch_config

        cfg = read_launch_config(accelerate_config)
        processes = int(cfg.data.get("num_processes") or 1)
        strategy = "zero3" if cfg.zero3 else "fsdp2" if cfg.is_fsdp else "zero2" if cfg.kind == "DEEPSPEED" \
            else "ddp" if processes > 1 else None
    found = estimate_for_recipe(recipe, num_processes=processes, strategy=strategy)
    lines = found.lines()
    warning = found.verdict(gpu_bytes) if gpu_bytes else None
    return lines + ([f"{PROG}: warning: memory: {warning}"] if warning else [])


def describe_more(recipe: Recipe, args: argparse.Namespace) -> list[str]:
    """What validate prints under the OK line: pretraining's token budget, the memory estimate."""
    lines: list[str] = []
    if recipe.task == "pretrain":
        from lora_ns.pretrain import describe_pretrain

        lines += describe_pretrain(recipe)
    elif not args.no_model and (gpu_bytes := args.gpu_memory or visible_gpu_memory()):
        lines += memory_report(recipe, args.accelerate_config, gpu_bytes)
    if args.show_sample:
        from lora_ns.validate.sample import show_sample

        lines += show_sample(recipe, args.show_sample)
    return lines


def describe(recipe: Recipe) -> str:
    quant = "4-bit" if recipe.quantization.load_in_4bit else "8-bit" if recipe.quantization.load_in_8bit else ""
    return f"{recipe.task}, {quant + ' ' if quant else ''}{recipe.peft.method} on {recipe.model.name_or_path}, " \
           f"data {recipe.dataset.path} ({recipe.dataset.formatter})"


def validate_paths(paths: list[Path], overrides: list[str], checks: Checks, args: argparse.Namespace) -> int:
    failed = 0
    for path in paths:
        try:
            recipe = check_recipe_file(path, overrides, checks=checks)
        except UserError as err:
            failed += 1
            for problem in err.problems:
                print(f"{PROG}: error: {problem}", file=sys.stderr)
            continue
        print(f"OK {path}: {describe(recipe)}")
        for line in describe_more(recipe, args):
            warning = line.startswith(PROG)
            print(line if warning else f"  {line}", file=sys.stderr if warning else sys.stdout)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args, args.overrides = make_parser().parse_known_args(argv)
    checks = Checks(data=not args.no_data, model=not args.no_model, accelerate_config=args.accelerate_config)
    if args.all:
        folder = Path(args.all)
        paths = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
        if not paths:
            raise UserError(Problem(str(folder), "", "no recipe files found", "pass a folder holding *.yaml recipes"))
        return validate_paths(paths, args.overrides or [], checks, args)
    if not args.recipe:
        raise UserError(Problem("<command line>", "", "no recipe given", "pass a recipe path, or --all"))
    return validate_paths([Path(args.recipe)], args.overrides or [], checks, args)


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
