"""``python -m lora_ns.validate RECIPE.yaml [overrides]`` or ``--all [DIR]``: check recipes before training.

Checks the schema (unknown keys with the closest valid one, types), then the cross-field rules in
`lora_ns.rules`. Needs no model weights and no network. Prints one line per problem; exits 0 when
every recipe is clean (warnings allowed), 2 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_ns.config import Recipe, load_recipe
from lora_ns.errors import Problem, UserError, run_cli

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


@dataclass(frozen=True)
class Checks:
    """Which of the slower checks to run beside the schema and the cross-field rules."""

    data: bool = True
    model: bool = True
    accelerate_config: str | None = None


def deep_problems(recipe: Recipe, checks: Checks) -> list[Problem]:
    """Checks that read the data sample, the model config, or the accelerate config."""
    problems: list[Problem] = []
    if checks.data:
        from lora_ns.data.inspect import check_dataset

        problems += check_dataset(recipe)
    if checks.model:
        from lora_ns.model_check import check_model

        problems += check_model(recipe)
    if checks.accelerate_config:
        from lora_ns.launch_checks import check_launch

        problems += check_launch(recipe, checks.accelerate_config)
    return problems


def check_recipe_file(path: str | Path, overrides: list[str] | None = None, for_training: bool = False,
                      checks: Checks = Checks()) -> Recipe:
    """Load and check one recipe; raise `UserError` with every error; print warnings; return the recipe."""
    from lora_ns.rules import check_rules

    recipe = load_recipe(path, overrides)
    if for_training:
        from lora_ns.checkpoints import guard_output_dir

        guard_output_dir(recipe)  # refuse a finished run at once, before the slower checks
    problems = check_rules(recipe, for_training)
    if not any(p.is_error for p in problems):
        problems += deep_problems(recipe, checks)
    errors = [p for p in problems if p.is_error]
    if errors:
        raise UserError(errors)
    for note in problems:  # warnings, and "info" lines such as dataset length stats
        print(f"{PROG}: {note.severity}: {note}", file=sys.stderr)
    return recipe


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
