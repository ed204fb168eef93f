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

from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.setup import Checks, check_recipe_file

PROG = "lora_ns.validate"
RECIPES_DIR = Path("recipes")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_ns.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", help="recipe YAML to check")
    parser.add_argument("--all", nargs="?", const=str(RECIPES_DIR), metavar="DIR",
                        help="check every *.yaml in DIR (default: recipes/)")
    parser.add_argument("--no-data", action="store_true", help="skip reading a sample of the dataset")
    parser.add_argument("--no-model", action="store_true", help="skip loading the model config (meta device)")
    parser.add_argument("--accelerate-config", metavar="YAML",
                        help="also check the recipe against this accelerate config (DeepSpeed/FSDP combinations)")
    return parser


def describe(recipe: Recipe) -> str:
    quant = "4-bit" if recipe.quantization.load_in_4bit else "8-bit" if recipe.quantization.load_in_8bit else ""
    return f"{recipe.task}, {quant + ' ' if quant else ''}{recipe.peft.method} on {recipe.model.name_or_path}, " \
           f"data {recipe.dataset.path} ({recipe.dataset.formatter})"


def validate_paths(paths: list[Path], overrides: list[str], checks: Checks) -> int:
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
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args, args.overrides = make_parser().parse_known_args(argv)
    checks = Checks(data=not args.no_data, model=not args.no_model, accelerate_config=args.accelerate_config)
    if args.all:
        folder = Path(args.all)
        paths = sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml"))
        if not paths:
            raise UserError(Problem(str(folder), "", "no recipe files found", "pass a folder holding *.yaml recipes"))
        return validate_paths(paths, args.overrides or [], checks)
    if not args.recipe:
        raise UserError(Problem("<command line>", "", "no recipe given", "pass a recipe path, or --all"))
    return validate_paths([Path(args.recipe)], args.overrides or [], checks)


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
