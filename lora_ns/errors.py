"""One error type for everything a user can get wrong, printed as one line per problem.

A `Problem` names the file, the field path (``training.learning_rate``) and, when known, the line
in the YAML file; it says what is wrong and how to fix it. Entry points catch `UserError` and
print its problems without a traceback (see `run_cli`).
"""

from __future__ import annotations

import atexit
import difflib
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, NoReturn, Sequence


@dataclass(frozen=True)
class Problem:
    """A single thing wrong with a recipe, a data file or a command line."""

    file: str
    field: str
    message: str
    fix: str = ""
    line: int | None = None
    severity: str = "error"  # "error" | "warning" | "info"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return f"{text} — {self.fix}" if self.fix else text

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class UserError(Exception):
    """Raised for bad input; carries one or more problems, each printed on one line."""

    def __init__(self, problems: Problem | Sequence[Problem]):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def suggest(word: str, options, what: str = "use one of", show: int | None = None) -> str:
    """'did you mean X?' for the closest option (a typo, or a prefix), else the options (the first `show`)."""
    options = sorted(options) if isinstance(options, (set, frozenset)) else list(options)  # stable order
    # a prefix every name shares ("builtin:", "fsdp_") would make any two names look alike: compare the rest
    cut = len(os.path.commonprefix([word, *options]))
    rests = [o[cut:] for o in options]
    close = [word[:cut] + m for m in difflib.get_close_matches(word[cut:], rests, n=1, cutoff=0.75)]
    close = close or [o for o in options if word.startswith(o) or o.startswith(word)][:1]
    show = show or len(options)
    more = f", ... ({len(options) - show} more)" if len(options) > show else ""
    return f"did you mean '{close[0]}'?" if close else f"{what}: {', '.join(options[:show])}{more}"


def fail(file: str, field: str, message: str, fix: str = "", line: int | None = None) -> UserError:
    """Build a one-problem `UserError` (``raise fail(...)``)."""
    return UserError(Problem(file, field, message, fix, line))


# Library log lines that are noise to every user, by logger name -> message prefix. bitsandbytes' CPU backend
# warns at import (peft imports it) that an optional kernel package is missing, even with nothing quantized.
# datasets' JSON builder logs a failed file before raising; lora_ns then names the bad line itself.
# TrainingArguments warns about torch.compile speed-ups on the machine that builds it: validate often runs
# on a laptop for a GPU run, and the line came between validate's one-line error and the user.
LIBRARY_NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
                 "datasets.packaged_modules.json.json": "Failed to load JSON from file",
                 "transformers.training_args": "The speedups for torchdynamo mostly come with GPU Ampere"}


def first_line(err: BaseException, limit: int = 200) -> str:
    """A library error in one line for our messages: its first line with the list that line introduces
    ("... but found" / "...:" then "- Evaluation strategy: steps" lines), or its type when it says nothing."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    text, items = lines[0], []
    for line in lines[1:]:
        if not (line.startswith("- ") or (text.endswith(":") and not items)):
            break
        items.append(line.removeprefix("- "))
    return (f"{text} {', '.join(items)}" if items else text)[:limit]


def _not_noise(record) -> bool:
    prefix = LIBRARY_NOISE.get(record.name)
    return prefix is None or not str(record.msg).startswith(prefix)


def quiet_library_noise() -> None:
    """Drop the LIBRARY_NOISE records (a filter on their own loggers, so nothing else is hidden; adding the
    same filter twice is a no-op)."""
    for name in LIBRARY_NOISE:
        logging.getLogger(name).addFilter(_not_noise)


def require(module: str, extra: str, feature: str):
    """Import an optional package, or stop with one line: what needs it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        fix = f"pip install 'lora_ns[{extra}]'"
        raise fail(feature, "", f"package '{package}' is not installed", fix) from None


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown of torch, transformers and co. (~3 s on 2 CPU cores,
    more than validate's own work: bench/README.md). Output is flushed and the atexit handlers run first, so
    nothing is lost; only for commands that leave no threads behind (validate)."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


_RUNNING: list[str] = []  # the names run_cli runs under, innermost last ("lora-ns validate")


def program(default: str) -> str:
    """The name a command's warnings go under: the one it was started as (`run_cli`), else `default`."""
    return _RUNNING[-1] if _RUNNING else default


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run an entry point; print user errors as one line each and return exit code 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notes, not the user's
    quiet_library_noise()
    _RUNNING.append(prog)
    try:
        return main()
    except UserError as err:
        for problem in err.problems:
            print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the checks up front could not foresee (a full disk, a path the OS
        if err.filename is None:  # refuses at creation); an OSError naming no file is a bug: shown whole
            raise
        print(f"{prog}: error: {err.filename}: {err.strerror or err} — check that its folder exists, can be "
              "written and has room", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        _RUNNING.pop()
