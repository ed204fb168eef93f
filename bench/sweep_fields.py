"""How much of what passes validate then fails in training: every field of a trainer's config (or a peft
method's) set to a suspicious value in turn (a bool flipped; an int 0 and -1; a float 0, -0.5, 2, nan and
inf; a str 'bogus'), validated with train's own set-up, and, when that passes, trained for two steps on the
tiny model.

    python bench/sweep_fields.py                    # causal_lm, seq_cls, dpo, kto, orpo, grpo, peft methods
    python bench/sweep_fields.py grpo peft:adalora  # some of them

A case is `refused` (validate said it), `trained`, `train-refused` (train's one-line net, after validate
passed) or `crashed` (a traceback: a check to add). Run it after a library upgrade: new fields come with new
ways to fail. About 20 minutes for all of them on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
import typing
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_ns.config import PEFT_MANAGED, parse_recipe  # noqa: E402
from lora_ns.errors import UserError  # noqa: E402
from lora_ns.hf_fields import peft_config_class  # noqa: E402
from lora_ns.preference import config_class  # noqa: E402
from lora_ns.setup import setup  # noqa: E402
from lora_ns.train import run_training  # noqa: E402

DATA = {"causal_lm": ("gsm8k", "gsm8k"), "dpo": ("preference", "preference"), "kto": ("kto", "kto"),
        "orpo": ("ultrafeedback", "ultrafeedback"), "grpo": ("gsm8k", "gsm8k_prompt"),
        "seq_cls": ("glue_mrpc", "glue_mrpc")}
# what the sweep cannot set meaningfully here: paths, hub and logging targets, GPU-only or vLLM settings
SKIP = {"output_dir", "logging_dir", "run_name", "report_to", "hub_token", "hub_model_id", "push_to_hub",
        "resume_from_checkpoint", "deepspeed", "fsdp", "fsdp_config", "use_cpu", "max_steps", "save_strategy",
        "dataloader_num_workers", "torch_compile", "tf32", "bf16", "fp16", "ddp_timeout", "reward_funcs",
        "use_vllm", "tools", "model_init_kwargs", "ref_model_init_kwargs", "debug", "local_rank",
        "target_modules", "modules_to_save", "init_lora_weights", "layer_replication", *PEFT_MANAGED}


def suspicious(cls) -> list[tuple[str, object]]:
    """(field, value) cases for a config dataclass."""
    hints, cases = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = str(hints.get(f.name))
        if f.name in SKIP or not f.init or f.name.startswith(("vllm", "hub_", "fsdp_")) or "list" in hint:
            continue
        if isinstance(f.default, bool):
            cases.append((f.name, not f.default))
        elif "int" in hint and "float" not in hint and "str" not in hint:
            cases += [(f.name, 0), (f.name, -1)]
        elif "float" in hint:
            cases += [(f.name, value) for value in (0.0, -0.5, 2.0, float("nan"), float("inf"))]
        elif "str" in hint and "dict" not in hint and not f.metadata.get("choices"):
            cases.append((f.name, "bogus"))
    return cases


def recipe_for(target: str, name: str, value: object, out: str):
    task, method = ("causal_lm", target[5:]) if target.startswith("peft:") else (target, "lora")
    sample, formatter = DATA[task]
    training = {"output_dir": out, "max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no",
                "logging_steps": 1, "report_to": "none", "max_length": 128}
    peft = {"method": method, **({"r": 8, "lora_alpha": 16} if method == "lora" else {}),
            **({"total_step": 2} if method == "adalora" else {}),
            **({"num_virtual_tokens": 4} if method in ("prefix_tuning", "prompt_tuning") else {})}
    model = {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"}
    if task == "grpo":
        training.update(reward_funcs=["gsm8k"], num_generations=2, max_completion_length=8)
    if task == "seq_cls":
        model.update(name_or_path="builtin:tiny-bert", num_labels=2)
        peft["target_modules"] = ["query", "value"]
    if task in ("grpo", "seq_cls"):
        del training["max_length"]
    (peft if target.startswith("peft:") else training)[name] = value
    return parse_recipe({"task": task, "model": model,
                         "peft": peft, "dataset": {"path": f"sample:{sample}", "formatter": formatter,
                                                   "max_samples": 16}, "training": training}, f"{target}.yaml")


def outcome(target: str, name: str, value: object) -> tuple[str, str]:
    return verdict(lambda out: recipe_for(target, name, value, out))


def verdict(build: typing.Callable[[str], typing.Any]) -> tuple[str, str]:
    """(kind, why) for the recipe `build(output_dir)` makes: validated with train's own set-up, then trained;
    also bench/sweep_combos.py's."""
    quiet = (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()))
    with tempfile.TemporaryDirectory() as out, quiet[0], quiet[1]:
        try:
            recipe = build(out)
            setup(recipe, dry_run=True)
        except UserError as err:
            return "refused", str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001 - the point is to see them
            return "crashed", f"validate: {type(err).__name__}: {err}"
        try:
            run_training(recipe)
        except UserError as err:
            return "train-refused", str(err).splitlines()[0]
        except Exception as err:  # noqa: BLE001
            return "crashed", f"train: {type(err).__name__}: {err}"
    return "trained", ""


def tally(bench: str, results: typing.Iterable[tuple[str, str, str]]) -> None:
    """Print each case's (columns, kind, why) as it finishes, then how many of each kind as one JSON line;
    also the other sweeps'."""
    counts: Counter = Counter()
    for columns, kind, why in results:
        counts[kind] += 1
        print(f"{columns} {kind:13} {why[:160]}", flush=True)
    print(json.dumps({"bench": bench, **counts}))


def main(targets: list[str]) -> None:
    from transformers import TrainingArguments
    from trl import SFTConfig

    counts = Counter()
    for target in targets:
        cls = peft_config_class(target[5:]) if target.startswith("peft:") else SFTConfig if target == \
            "causal_lm" else TrainingArguments if target == "seq_cls" else config_class(target)
        for name, value in suspicious(cls):
            kind, why = outcome(target, name, value)
            counts[kind] += 1
            if kind in ("train-refused", "crashed"):  # trained: a value the run takes (maybe to no effect)
                print(f"{target:18} {name:32} {value!r:8} {kind:13} {why[:120]}", flush=True)
    print(json.dumps({"bench": "sweep_fields", **counts}))


if __name__ == "__main__":
    main(sys.argv[1:] or ["causal_lm", "seq_cls", "dpo", "kto", "orpo", "grpo", *(f"peft:{m}" for m in (
        "lora", "adalora", "ia3", "prefix_tuning", "prompt_tuning"))])
