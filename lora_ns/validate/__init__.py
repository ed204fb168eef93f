"""Recipe checks behind ``python -m lora_ns.validate`` (the command line is in ``__main__``).

- `rules`: our own cross-field rules, only what the libraries do not check themselves;
- `model`: the model config and the model on the meta device, with the peft config applied;
- `data`: a sample of rows through training's formatter, renderer and tokenizer;
- `launch`: the recipe against an accelerate config (DeepSpeed / FSDP combinations).

They run inside train's own set-up (`lora_ns.setup.setup`), which builds the real training
arguments and peft config: validate is train's set-up stopped before the weights.
"""

from lora_ns.setup import Checks, check_recipe_file

__all__ = ["Checks", "check_recipe_file", "main", "make_parser"]


def __getattr__(name: str):
    """The command line (`main`, `make_parser`, for `lora-ns validate`) is imported only when asked for."""
    if name in ("main", "make_parser"):
        from lora_ns.validate import __main__ as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
