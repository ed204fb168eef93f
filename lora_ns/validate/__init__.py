"""Recipe checks behind ``python -m lora_ns.validate`` (command line in ``__main__``): `rules`, `model`,
`data`, `tokens`, `launch`. They run inside train's own set-up (`lora_ns.setup.setup`): validate is train's
set-up stopped before the weights."""


def __getattr__(name: str):
    """`main` / `make_parser` (every command module has them), imported when asked for: importing ``__main__``
    here would make ``python -m lora_ns.validate`` find it in sys.modules already (runpy warns)."""
    if name in ("main", "make_parser"):
        from lora_ns.validate import __main__ as command

        return getattr(command, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
