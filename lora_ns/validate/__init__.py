"""Recipe checks behind ``python -m lora_ns.validate`` (the command line is in ``__main__``): `rules` (our own
cross-field rules), `model` (config and meta-device model with the peft config), `data` (a row sample through
training's tokenization), `launch` (the recipe against an accelerate config). They run inside train's own
set-up (`lora_ns.setup.setup`): validate is train's set-up stopped before the weights."""

from lora_ns.setup import Checks, check_recipe_file

__all__ = ["Checks", "check_recipe_file", "main", "make_parser"]


def __getattr__(name: str):
    """`main` / `make_parser` (for `lora-ns validate`), imported only when asked for: importing ``__main__``
    here would make ``python -m lora_ns.validate`` find it already in sys.modules (runpy warns)."""
    if name in ("main", "make_parser"):
        from lora_ns.validate import __main__ as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
