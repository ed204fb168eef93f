"""Field names and types of the HF config dataclasses a recipe's `training:` and `peft:` sections feed:
TRL's `SFTConfig` (causal_lm, cpt), transformers' `TrainingArguments` (seq_cls), the method's peft config;
and the training keys older versions had, with what to write now.

Importing them takes seconds, so what `dataclasses.fields` reads is kept in
``$LORA_NS_CACHE/fields-<versions>.json``, keyed by the installed trl/transformers/peft versions (package
metadata, no import): checking a recipe's keys (``validate --no-model --no-data``) imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib.metadata import version
from typing import Callable

from lora_ns.builtin_models import cache_dir
from lora_ns.fileio import write_text_atomic

# The recipe's peft methods (config.PeftMethod adds full fine-tuning) -> peft's PeftType name.
PEFT_TYPES = {"lora": "LORA", "qlora": "LORA", "adalora": "ADALORA", "ia3": "IA3",
              "prefix_tuning": "PREFIX_TUNING", "prompt_tuning": "PROMPT_TUNING"}


def peft_task_type(task: str) -> str:
    """The peft task type a recipe's task trains: a classifier's adapter carries its head, the others none."""
    return "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM"


# training keys of older tutorials that transformers 5 / TRL 1 dropped, and what to write instead
# (renames difflib finds, such as evaluation_strategy or max_seq_length, need no entry)
DROPPED_TRAINING_KEYS = {
    "warmup_ratio": "use warmup_steps: a value below 1 is a share of the run (e.g. 0.03)",
    "no_cuda": "use use_cpu: true",
    "save_safetensors": "remove it: checkpoints are always safetensors",
    "logging_dir": "remove it: logs go under output_dir (or set TENSORBOARD_LOGGING_DIR)",
    "torch_dtype": "set model.dtype (bf16, fp16, fp32 or auto) instead",
    "rpo_alpha": "DPO: add the SFT loss instead (loss_type: [sigmoid, sft], loss_weights: [1.0, 1.0])",
    "max_prompt_length": "remove it: TRL 1 cuts whole rows at max_length (see truncation_mode)",
    "group_by_length": "use train_sampling_strategy: group_by_length",
    "use_mps_device": "remove it: an Apple GPU is used when there is one (use_cpu: true keeps to the CPU)",
    "fp16_backend": "remove it: mixed precision is torch's AMP (fp16: true or bf16: true)",
    "half_precision_backend": "remove it: mixed precision is torch's AMP (fp16: true or bf16: true)",
    "fp16_opt_level": "remove it (apex is gone): fp16: true or bf16: true",
    "dispatch_batches": "set it under accelerator_config: {dispatch_batches: ...}",
    "split_batches": "set it under accelerator_config: {split_batches: ...}",
    "torchdynamo": "use torch_compile: true (torch_compile_backend names the backend)",
    "fsdp_transformer_layer_cls_to_wrap": "put it in fsdp_config, or launch with an accelerate FSDP config",
    "fsdp_min_num_params": "put min_num_params in fsdp_config, or launch with an accelerate FSDP config",
    "dataset_batch_size": "remove it: TRL 1 packs with packing: true at max_length",
    "num_of_sequences": "remove it: TRL 1 packs with packing: true at max_length",
    "chars_per_token": "remove it: TRL 1 packs with packing: true at max_length",
    "push_to_hub_token": "remove it: log in with `hf auth login` (or HF_TOKEN); a recipe holds no token",
}
# Booleans TRL maps to one of a string field's values (GRPOConfig.__post_init__): read as that value, so the
# string type check (config) and preference.TRL_VALUES accept what TRL documents.
TRL_BOOL_VALUES = {"scale_rewards": {True: "group", False: "none"}}


def peft_config_class(method: str):
    """The peft config class of a method (LoraConfig for lora and qlora, ...)."""
    from peft import PEFT_TYPE_TO_CONFIG_MAPPING, PeftType

    return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType[PEFT_TYPES[method]]]


def _init_fields(cls) -> dict[str, str]:
    """Each init field's type as source-like text (`int | None`, `Optional[str]`), whatever form it is in."""
    def text(kind: object) -> str:  # a class, a typing object, or already text (postponed annotations)
        return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")

    return {f.name: text(f.type) for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _cached(key: str, read: Callable[[], dict[str, str]]) -> dict[str, str]:
    """`read()`, remembered on disk per library versions (a broken or unwritable cache is only slower)."""
    tag = "-".join(f"{name}{version(name)}" for name in ("trl", "transformers", "peft"))  # all required
    path = cache_dir() / f"fields-{tag}.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = read()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(known, sort_keys=True))
        except OSError:
            pass
    return known[key]


@functools.cache
def training_fields(task: str) -> dict[str, str]:
    """Map field name -> annotation of the training arguments class of a task, plus lora_ns's own keys."""
    def read() -> dict[str, str]:
        from lora_ns.setup import training_arguments_class  # here: setup imports config, which imports us

        return _init_fields(training_arguments_class(task))

    return {**_cached(f"training:{task}", read), **own_training_fields(task)}


@functools.cache
def peft_fields(method: str) -> dict[str, str]:
    """Map field name -> annotation of the method's peft config class ({} for full or an unknown method)."""
    if method not in PEFT_TYPES:
        return {}
    return _cached(f"peft:{PEFT_TYPES[method]}", lambda: _init_fields(peft_config_class(method)))


# Keys of a recipe's `training:` section that lora_ns reads itself, not passed to the HF class ("": any task).
OWN_TRAINING_FIELDS = {"": {"overwrite_output_dir": "bool"},  # allow training over a finished run
                       "grpo": {"reward_funcs": "list"},  # the reward functions, see lora_ns.preference
                       "seq_cls": {"max_length": "Optional[int]"}}  # truncation (TrainingArguments has none)


def own_training_fields(task: str) -> dict[str, str]:
    return {**OWN_TRAINING_FIELDS[""], **OWN_TRAINING_FIELDS.get(task, {})}


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None), "NoneType": type(None),
           "list": list, "List": list, "tuple": list, "Tuple": list, "Sequence": list,
           "dict": dict, "Dict": dict, "Optional": None}


def coerce(value: object, annotation: str) -> tuple[bool, object]:
    """Check a YAML value against an annotation of plain Python types (anything richer accepts all),
    converting strings like ``"2e-4"`` to numbers: YAML 1.1 reads ``2e-4`` (no dot) as a string, a classic
    trap for learning rates. Returns (ok, value)."""
    parts = annotation.replace("Optional[", "None|").replace("Union[", "").replace("]", "").replace(",", "|")
    names = {n.split("[")[0].strip().split(".")[-1] for n in parts.split("|")} - {""}
    if not names <= set(_SIMPLE):
        return True, value
    types = {_SIMPLE[n] for n in names} - {None}
    if type(value) in types:
        return True, value
    if isinstance(value, bool):
        return False, value
    if isinstance(value, int) and float in types:
        return True, float(value)
    if isinstance(value, str):
        for kind in (int, float):
            if kind in types:
                try:
                    return True, kind(value)
                except ValueError:
                    pass
    if isinstance(value, (list, tuple)) and list in types:
        return True, list(value)
    if isinstance(value, str) and types == {list}:  # one name for a list of them, as TRL wraps loss_type
        return True, [value]
    return False, value
