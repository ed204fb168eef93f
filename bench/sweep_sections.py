"""bench/sweep_fields.py for lora_ns's own recipe sections: every field of ``model:``, ``dataset:`` and
``quantization:`` set in turn to each choice it lists and to suspicious values (a bool flipped; an int 0, -1
and a huge one; a text empty, 'bogus' or a missing path; an empty list or mapping), for three tasks, then
validated with train's own set-up and, when that passes, trained two steps on the tiny models.

    python bench/sweep_sections.py                # every case (~10 minutes on 2 CPU cores)
    python bench/sweep_sections.py seq_cls        # one task's

A case is `refused` (validate said it), `trained`, `train-refused` (train's one-line net, after validate
passed) or `crashed` (a traceback: a check to add).
"""

from __future__ import annotations

import json
import os
import sys
import typing
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_ns.config import DatasetConfig, ModelConfig, QuantizationConfig, parse_recipe  # noqa: E402
from sweep_combos import base  # noqa: E402  (bench/ is the script's folder)
from sweep_fields import tally, verdict  # noqa: E402

TASKS = ("causal_lm", "seq_cls", "grpo")
SECTIONS = {"model": ModelConfig, "dataset": DatasetConfig, "quantization": QuantizationConfig}
# what each case is built on (bench/sweep_models.py and sweep_data.py sweep them)
SKIP = {"name_or_path", "path", "formatter"}


def values(annotation) -> list:
    """The values tried for a field of this type."""
    text, found = str(annotation), []
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is typing.Literal:
            found += list(typing.get_args(arg))
    if "bool" in text:
        found += [True, False]
    if "int" in text:
        found += [0, -1, 2**32]
    if "float" in text:
        found += [0.0, 1.0, 0.999]
    if "str" in text and typing.Literal not in (typing.get_origin(annotation),):
        found += ["", "bogus", "/nonexistent/x"]
    if "list" in text:
        found += [[], ["bogus"], ["a", "a"]]
    if "dict" in text:
        found += [{}, {"bogus": "x"}]
    return found + [None] * ("None" in text)


def cases() -> list[tuple[str, str, str, object]]:
    found = [(task, section, name, value) for task in TASKS for section, cls in SECTIONS.items()
             for name, field in cls.model_fields.items() if name not in SKIP
             for value in values(field.annotation)]
    return [case for case in found if case[2:] != ("num_labels", 2**32)]  # a head that only runs out of RAM


def outcome(task: str, section: str, name: str, value: object) -> tuple[str, str]:
    def recipe(out: str):
        config = base(task, "lora", f"{out}/run")
        config.setdefault(section, {})[name] = value
        return parse_recipe(config, "case.yaml")

    return verdict(recipe)


def results(chosen: list[str]) -> Iterator[tuple[str, str, str]]:
    for task, section, name, value in cases():
        if not chosen or task in chosen:
            columns = f"{task:9} {section}.{name:22} {json.dumps(value)[:20]:20}"
            yield columns, *outcome(task, section, name, value)


def main(chosen: list[str]) -> None:
    tally("sweep_sections", results(chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
