"""Rules for the peft section (listed in `lora_ns.validate.rules.RULES`): the method fits the quantization and
checkpointing, its values are ones the adapter trains with, and ``peft.init_from`` names an adapter of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from lora_ns.adapters import PROJECTION_NOT_SAVED
from lora_ns.builtin_models import PREFIX
from lora_ns.checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_weights_defect
from lora_ns.config import Recipe
from lora_ns.errors import Problem
from lora_ns.hf_fields import PEFT_TYPES, peft_task_type
from lora_ns.model import gradient_checkpointing

DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")
# sizes peft builds the adapter with (prompt learning's virtual tokens and the layout it fills in from the
# model, AdaLoRA's ranks and update interval): below 1 it fails to build, or stops at the first step;
# AdaLoRA's warm-up and final steps below 0 shift its rank budget schedule off the run
LEAST = {**dict.fromkeys(("num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers",
                          "num_attention_heads", "init_r", "target_r", "deltaT"), 1), "tinit": 0, "tfinal": 0}


def quantization_fits_method(r: Recipe) -> Iterator[Problem]:
    q = r.quantization
    if r.peft.method == "qlora" and not q.load_in_4bit:
        yield r.problem("peft.method", "qlora needs a 4-bit base model",
                        "set quantization.load_in_4bit: true")
    if q.load_in_4bit and q.load_in_8bit:
        yield r.problem("quantization.load_in_8bit", "4-bit and 8-bit are both set", "choose one of them")
    if r.quantized and r.peft.method == "full":
        yield r.problem("peft.method", "a quantized model cannot be fully fine-tuned",
                        "use peft.method: qlora (or lora), or turn quantization off")


def checkpointing_fits_method(r: Recipe) -> Iterator[Problem]:
    """Gradient checkpointing recomputes a layer without prefix tuning's virtual keys and values: the first
    backward stops on a size mismatch (transformers 5, Llama and Qwen2 alike)."""
    if r.peft.method == "prefix_tuning" and gradient_checkpointing(r):
        key = next((k for k in ("activation_checkpointing", "gradient_checkpointing") if k in r.training),
                   "gradient_checkpointing")
        yield r.problem(f"training.{key}", "prefix tuning cannot train with gradient checkpointing: "
                        "recomputed layers lose its virtual tokens (a size mismatch at the first step)",
                        f"set training.{key}: false")


def method_fits_trainer(r: Recipe) -> Iterator[Problem]:
    """Adapters a TRL trainer builds on, then stops at: it starts once the weights have loaded."""
    method, grpo_reference = r.peft.method, r.task == "grpo" and (r.training.get("beta") or 0) > 0
    if method == "adalora" and (r.task in ("dpo", "kto") or grpo_reference):
        yield r.problem("peft.method", f"TRL's {r.task} trainer adds a frozen copy of the adapter as its "
                        "reference model, and peft takes one AdaLoRA adapter per model only", "use lora" +
                        (", or training.beta: 0 (no reference model)" if r.task == "grpo" else ""))
    if method == "prompt_tuning" and r.task == "orpo":
        yield r.problem("peft.method", "ORPO (trl.experimental) lines its labels up with logits that prompt "
                        "tuning lengthens by its virtual tokens: a size mismatch at the first step",
                        "use lora, or prefix_tuning")


def peft_values(r: Recipe) -> Iterator[Problem]:
    """Values peft takes, then fails on (building the adapter, or at the first step) or trains nothing on."""
    options = r.peft.options
    for key, least in LEAST.items():
        if isinstance(options.get(key), int) and options[key] < least:
            yield r.problem(f"peft.{key}", f"{key} is {options[key]}: it must be at least {least}",
                            f"set peft.{key} to {least} or more, or remove it for peft's default")
    if options.get("layers_to_transform") is not None and isinstance(options.get("target_modules", ""), str):
        default = "" if "target_modules" in options else " (lora_ns's default is the string 'all-linear')"
        yield r.problem("peft.layers_to_transform", f"peft picks layers among target_modules given as a list"
                        f"{default}", "list peft.target_modules too, e.g. [q_proj, k_proj, v_proj, o_proj]")
    # peft reads a dropout below 0 as none; 1 drops every input of the adapter, which then learns nothing
    if isinstance(p := options.get("lora_dropout"), (int, float)) and not 0 <= p < 1:
        yield r.problem("peft.lora_dropout", f"{p} is outside [0, 1)", "use e.g. 0.05, or 0 for none")
    for key in ("beta1", "beta2") if r.peft.method == "adalora" else ():  # AdaLoRA's sensitivity averages
        if isinstance(beta := options.get(key), (int, float)) and not 0 < beta < 1:
            yield r.problem(f"peft.{key}", f"{beta} is outside (0, 1)", f"remove peft.{key} for peft's 0.85")
    # LoRA's scale is lora_alpha / r: 0 trains nothing, < 0 is no scale (the schema refuses it elsewhere)
    if (alpha := options.get("lora_alpha")) is not None and alpha <= 0:
        yield r.problem("peft.lora_alpha", f"lora_alpha {options['lora_alpha']} must be positive",
                        "set peft.lora_alpha (commonly 2 x peft.r, e.g. 16)")
    # peft computes these in a pass over the data, a separate call lora_ns does not make: without it eva and
    # lora_ga silently train a plain LoRA, corda stops when the adapter is built
    if (init := options.get("init_lora_weights")) in DATA_DRIVEN_INITS:
        yield r.problem("peft.init_lora_weights", f"'{init}' needs peft's data-driven initialisation "
                        "pass, which lora_ns does not run", "use pissa, olora, orthogonal, gaussian or true")


def init_adapter_fits(r: Recipe) -> Iterator[Problem]:
    """peft.init_from names an adapter folder of the same method; its own config wins over other peft keys."""
    if not (path := r.peft.init_from):
        return
    if r.peft.method == "full":
        yield r.problem("peft.init_from", "full fine-tuning has no adapter to start from",
                        "name the merged model in model.name_or_path instead")
        return
    config_file = Path(path) / ADAPTER_CONFIG  # (a ~ was expanded as the recipe loaded)
    try:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        why = "not found" if isinstance(err, FileNotFoundError) else f"unreadable ({type(err).__name__})"
        yield r.problem("peft.init_from", f"{config_file} {why}",
                        "point it at an adapter folder (a training output_dir)")
        return
    kind, method, model = str(saved.get("peft_type", "")).upper(), r.peft.method, r.model.name_or_path
    if kind != PEFT_TYPES[method]:
        yield r.problem("peft.init_from", f"{path} holds a {kind or 'unknown'} adapter, peft.method is "
                        f"{method}",
                        f"set peft.method to the adapter's method, or start a fresh {method} adapter")
    if saved.get("prefix_projection"):
        yield r.problem("peft.init_from", f"{path}: {PROJECTION_NOT_SAVED}",
                        "start a fresh adapter (prefix tuning without prefix_projection can be continued)")
    if (task_type := saved.get("task_type")) and task_type != (wanted := peft_task_type(r.task)):
        yield r.problem("peft.init_from", f"{path} holds a {task_type} adapter, this {r.task} recipe trains "
                        f"a {wanted} one", "start from an adapter of the same task, or remove peft.init_from")
    if why := adapter_weights_defect(config_file.parent):
        yield r.problem("peft.init_from", f"{config_file.parent / ADAPTER_WEIGHTS}: {why}", "point it at a "
                        "complete adapter folder (its weights saved as safetensors)")
    if r.peft.options:
        yield r.problem("peft.init_from", "the adapter's own config is used; ignoring "
                        f"{', '.join(sorted(r.peft.options))}", "remove those keys", "warning")
    base = str(saved.get("base_model_name_or_path") or "")
    if base and Path(base).name != Path(model).name and not model.startswith(PREFIX):
        yield r.problem("peft.init_from", f"the adapter was trained on {base}, this recipe loads {model}",
                        "use the adapter's base model (shapes must match)", "warning")
