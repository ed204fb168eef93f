"""Recipe checks behind ``python -m lora_ns.validate`` (the command line is in ``__main__``).

- `rules`: our own cross-field rules, only what the libraries do not check themselves;
- `model`: the model config and the model on the meta device, with the peft config applied;
- `data`: a sample of rows through training's formatter, renderer and tokenizer;
- `launch`: the recipe against an accelerate config (DeepSpeed / FSDP combinations).

They run inside train's own set-up (`lora_ns.setup.setup`), which builds the real training
arguments and peft config: validate is train's set-up stopped before the weights.
"""

from lora_ns.setup import Checks, check_recipe_file

__all__ = ["Checks", "check_recipe_file", "main"]


def __getattr__(name: str):
    """`main` (the command line, for `lora-ns validate`) is imported only when asked for."""
    if name == "main":
        from lora_ns.validate.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
