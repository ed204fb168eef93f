"""The argument parser every command uses: one-line errors, and the flag spellings users bring along.

Users arrive with habits: Hugging Face scripts spell flags in snake_case (``--output_dir``), and the
scripts lora_ns descends from used ``--model_path``, ``--adapter_path``, ``--input_text`` and so on.
`CommandParser` accepts ``--foo_bar`` for ``--foo-bar`` (and the reverse), plus each command's own
legacy names (``aliases``), without listing them in ``--help``. A leading ``~`` in the `paths` arguments is
expanded (``--output=~/run`` named a folder "~" in the working directory). Tokens that name no option of the
command, such as recipe overrides (``--training.output_dir 5``), are left exactly as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from lora_ns.errors import fail


class CommandParser(argparse.ArgumentParser):
    def __init__(self, *args, aliases: dict[str, str] | None = None, paths: Sequence[str] = (),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.aliases, self.paths = aliases or {}, paths

    def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
        args = self.canonical(list(sys.argv[1:] if args is None else args))
        namespace, rest = super().parse_known_args(args, namespace)
        for name in self.paths:  # a shell expands ~ in "--output ~/run", not in "--output=~/run"
            if isinstance(value := getattr(namespace, name, None), str):
                setattr(namespace, name, os.path.expanduser(value))
        return namespace, rest

    def canonical(self, args: list[str]) -> list[str]:
        """``args`` with every alias or other spelling of a known option replaced by its own name."""
        known, out = self._option_string_actions, []
        for i, token in enumerate(args):
            if token == "--":  # everything after it is positional
                return out + args[i:]
            flag, eq, value = token.partition("=")
            if token.startswith("--") and flag not in known:
                spellings = (self.aliases.get(flag), flag.replace("_", "-"), flag.replace("-", "_"))
                token = next((s + eq + value for s in spellings if s and s in known), token)
            out.append(token)
        return out

    def error(self, message: str):  # one line, like every other user error, instead of usage + error
        raise fail("<command line>", "", message, f"run '{self.prog} --help'")


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse `type` of counts (--batch-size, --num-workers, ...): a bad one is a one-line error."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, got {text!r}")
        return int(text)
    return parse


at_least_one = at_least(1)
