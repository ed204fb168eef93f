"""``lora-ns COMMAND [args...]``: one entry point for every ``python -m lora_ns.<command>`` module.

Dispatch is lazy: the command's module is imported only once it is chosen, and it parses its own
arguments, so ``lora-ns --help`` and ``lora-ns validate --help`` never import torch or transformers,
and ``lora-ns train --help`` prints exactly what ``python -m lora_ns.train --help`` prints.
The command's exit code is passed through.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from lora_ns import __version__
from lora_ns.command_line import CommandParser
from lora_ns.errors import exit_now, fail, run_cli, suggest

PROG = "lora-ns"

# command -> one-line description (kept here so the overview needs no import of the modules).
COMMANDS: dict[str, str] = {
    "train": "fine-tune a model as a recipe describes",
    "validate": "check recipes before training (schema, rules, data sample, model config)",
    "merge": "merge an adapter into its base model and save the result",
    "infer": "generate with a base model, an adapter or a merged model",
    "evaluate": "score a trained adapter or model on the recipe's eval split",
    "compare": "answer the same prompts with the base and the tuned model, side by side",
    "preprocess": "turn a folder of raw documents into one clean text file",
}


# The script names of the toolkit lora_ns descends from (validate_config.py, inference.py, merge_adapter.py).
LEGACY_COMMANDS = {"validate_config": "validate", "inference": "infer", "merge_adapter": "merge"}
# Commands that are a mode of another one: `lora-ns compare ARGS` runs `lora-ns infer --compare ARGS`.
MODES = {"compare": ("infer", "--compare")}


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: used for ``--help`` and ``--version``; commands parse their own arguments."""
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    parser = CommandParser(
        prog=PROG, usage=f"{PROG} [-h] [-V] COMMAND [ARGS ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Parameter-efficient fine-tuning recipes on the Hugging Face stack.",
        epilog=f"commands:\n{listing}\n\n"
               f"Run '{PROG} COMMAND --help' for a command's options ('python -m lora_ns.COMMAND --help').")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _exit_code(exc: SystemExit) -> int:
    """The int a `SystemExit` stands for (argparse raises it for --help and for bad arguments)."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def run_command(name: str, args: list[str]) -> int:
    """Import ``lora_ns.<name>`` (or the command it is a mode of) and run its ``main(args)``; errors print as
    ``lora-ns <name>: error:``."""
    module_name, *flags = MODES.get(name, (name,))
    try:
        module = importlib.import_module(f"lora_ns.{module_name}")
    except ModuleNotFoundError as err:
        if err.name != f"lora_ns.{module_name}":  # a dependency of the command is missing: not ours to hide
            raise
        raise fail("<command line>", name, "this command is not available in this install",
                   "update lora_ns (pip install -U lora_ns)")
    try:
        code = run_cli(f"{PROG} {name}", lambda: module.main([*flags, *args]))
    except SystemExit as exc:
        return _exit_code(exc)
    return 0 if code is None else int(code)


def command_name(word: str) -> str:
    """Our name for a command word: the old script names (``validate_config.py``) map to ours."""
    return LEGACY_COMMANDS.get(word.removesuffix(".py"), word)


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "help":  # `lora-ns help train` == `lora-ns train --help`
        argv = [argv[1], "--help"] if len(argv) > 1 else ["--help"]
    if not argv or argv[0].startswith("-"):
        args = make_parser().parse_args(argv)  # prints --help / --version and exits
        if args.command is None:
            raise fail("<command line>", "", "no command given",
                       f"run '{PROG} --help'; commands: {', '.join(COMMANDS)}")
        argv = [args.command, *args.args]
    name, rest = argv[0], argv[1:]
    name = command_name(name)
    if name not in COMMANDS:
        raise fail("<command line>", name, "unknown command", suggest(name, COMMANDS))
    return run_command(name, rest)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point (``lora-ns``); also callable in-process with a list of arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = run_cli(PROG, lambda: dispatch(args))
    except SystemExit as exc:
        code = _exit_code(exc)
    if argv is None and args and command_name(args[0]) == "validate":
        exit_now(code)  # as `python -m lora_ns.validate` does: no ~3 s teardown of torch and co.
    return code


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
