"""``python -m lora_ns.validate RECIPE.yaml [overrides]`` or ``--all [DIR]``: check recipes before training.

Checks the schema (unknown keys with the closest valid one, types), then runs train's own set-up
(`lora_ns.setup`) in dry-run: the rules, the real training arguments and peft config, the model on the
meta device, a data sample through the tokenizer. Needs no model weights and no network. Prints one
line per problem; exits 0 when every recipe is clean (warnings allowed), 2 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from lora_ns.command_line import CommandParser, at_least_one
from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, exit_now, program, run_cli
from lora_ns.memory import estimate_for_recipe
from lora_ns.pretrain import describe_pretrain
from lora_ns.setup import Checks, check_recipe_file
from lora_ns.validate.launch import read_launch_config
from lora_ns.validate.data import SAMPLE_ROWS
from lora_ns.validate.sample import sampled_lengths, show_sample

PROG = "lora_ns.validate"


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m lora_ns.validate", description=__doc__.split("\n\n")[0],
                           paths=("recipe", "all", "accelerate_config"))
    parser.add_argument("recipe", nargs="?", help="recipe YAML to check")
    parser.add_argument("--all", nargs="?", const="recipes", metavar="DIR",
                        help="check every *.yaml in DIR (default: recipes/)")
    parser.add_argument("--no-data", action="store_true", help="skip reading a sample of the dataset")
    parser.add_argument("--no-model", action="store_true", help="skip loading the model config (meta device)")
    parser.add_argument("--accelerate-config", metavar="YAML",
                        help="also check the recipe against this accelerate config (DeepSpeed/FSDP)")
    parser.add_argument("--num-processes", type=at_least_one, metavar="N", help="processes the launch "
                        "starts (default: the accelerate config's num_processes, else 1)")
    parser.add_argument("--show-sample", nargs="?", type=at_least_one, const=3, metavar="N",
                        help="print N (default 3) training examples as train sees them, loss tokens marked")
    parser.add_argument("--gpu-memory", metavar="SIZE", type=memory_size,
                        help="print the per-GPU memory estimate; warn over 90%% of SIZE (24GiB, 80GB)")
    return parser


def memory_size(text: str) -> int:
    """'24GiB', '80GB' (decimal), '24g' (binary), or a number of bytes (1 MiB or more) -> bytes."""
    match = re.fullmatch(r"([\d.]+)\s*([kmgt]?)(i?)(b?)", text.strip().lower())
    try:
        value = float(match[1]) * (1000 if match[4] and not match[3] else 1024) ** " kmgt".index(match[2])
    except (TypeError, ValueError):  # no match, or not a number
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 24GiB, 80GB)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a memory size must be positive")
    if value < 1 << 20:  # '80' read as 80 bytes made every recipe "over 90%" of the card
        raise argparse.ArgumentTypeError(f"{text!r} is {value:.0f} bytes: give a unit, e.g. {text}GiB")
    return int(value)


def memory_report(recipe: Recipe, args: argparse.Namespace) -> list[str]:
    """The per-GPU estimate (lora_ns.memory) for this launch, with the sample's rows as train tokenizes them,
    and a warning line when it will not fit the card (--gpu-memory, else the visible GPU; none: no report)."""
    import torch

    gpu_bytes = args.gpu_memory or (torch.cuda.get_device_properties(0).total_memory
                                    if torch.cuda.is_available() else None)
    if not gpu_bytes:
        return []
    cfg = read_launch_config(args.accelerate_config) if args.accelerate_config else None
    lengths = []
    if not args.no_data:
        try:
            lengths = sampled_lengths(recipe, SAMPLE_ROWS)
        except UserError:  # e.g. a Hub dataset out of reach: the data checks said so already
            pass
    try:
        processes = args.num_processes or (cfg.processes if cfg else 1)
        found = estimate_for_recipe(recipe, processes, cfg.strategy if cfg else None, lengths)
    except UserError as err:  # e.g. a hub model offline: the model check already warned; not a reason to fail
        return [f"{program(PROG)}: warning: memory estimate skipped: {err.problems[0]}"]
    warning = found.verdict(gpu_bytes)
    return found.lines() + ([f"{program(PROG)}: warning: memory: {warning}"] if warning else [])


def describe_more(recipe: Recipe, args: argparse.Namespace) -> list[str]:
    """What validate prints under the OK line: pretraining's token budget, the memory estimate, a sample."""
    lines = describe_pretrain(recipe) if recipe.task == "pretrain" else []
    if recipe.task != "pretrain" and not args.no_model:
        lines += memory_report(recipe, args)
    return lines + (show_sample(recipe, args.show_sample) if args.show_sample else [])


def describe(recipe: Recipe) -> str:
    q = recipe.quantization
    quant = "4-bit " if q.load_in_4bit else "8-bit " if q.load_in_8bit else ""
    return f"{recipe.task}, {quant}{recipe.peft.method} on {recipe.model.name_or_path}, " \
           f"data {recipe.dataset.path} ({recipe.dataset.formatter})"


def main(argv: list[str] | None = None) -> int:
    args, overrides = make_parser().parse_known_args(argv)
    checks = Checks(data=not args.no_data, model=not args.no_model, accelerate_config=args.accelerate_config,
                    processes=args.num_processes, gpu_memory=args.gpu_memory)
    folder = Path(args.all) if args.all else None
    paths = sorted(folder.glob("*.y*ml")) if folder else [Path(args.recipe or "")]
    if folder and not paths:
        raise UserError(Problem(str(folder), "", "no recipe files found",
                                "pass a folder holding *.yaml recipes"))
    if not (folder or args.recipe):
        raise UserError(Problem("<command line>", "", "no recipe given", "pass a recipe path, or --all"))
    failed = 0
    for path in paths:
        try:
            recipe = check_recipe_file(path, overrides, checks=checks)
        except UserError as err:
            failed += 1
            print("\n".join(f"{program(PROG)}: error: {p}" for p in err.problems), file=sys.stderr)
            continue
        print(f"OK {path}: {describe(recipe)}")
        for line in describe_more(recipe, args):
            warning = line.startswith(program(PROG))
            print(line if warning else f"  {line}", file=sys.stderr if warning else sys.stdout)
    return 2 if failed else 0


if __name__ == "__main__":
    exit_now(run_cli(PROG, lambda: main(sys.argv[1:])))
