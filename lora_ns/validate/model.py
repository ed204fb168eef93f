"""Model checks for `validate`, from the model's config alone: no weights are read or downloaded.

- the attention implementation's package (flash-attn) and, for quantized recipes, whether
  bitsandbytes is installed and actually runs here (a 4-bit / 8-bit layer does one forward pass);
- the model config (AutoConfig): builtin models resolve locally, a hub model comes from the cache or,
  when the Hub answers, as config.json alone. Unreachable (offline, gated) is a warning, not an error:
  the remaining model checks are skipped. A local folder that does not exist is an error;
- the model built on the meta device (accelerate's ``init_empty_weights``): every name in
  ``target_modules`` must match a module (the error lists the linear layers there are), then the
  recipe's peft config is applied and the trainable / total parameter counts are reported as info.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lora_ns.config import Recipe
from lora_ns.errors import Problem

SKIPPED = "model checks skipped"


def check_model(recipe: Recipe) -> list[Problem]:
    """Problems (errors, warnings, one info line with parameter counts) found without model weights."""
    from lora_ns.model import attention_problem, model_folder_problem

    problems = [p for p in (attention_problem(recipe), bitsandbytes_problem(recipe)) if p is not None]
    if (missing := missing_folder(recipe) or model_folder_problem(recipe)) is not None:
        return problems + [missing]
    config, why = load_config(recipe)
    if config is None:
        return problems + [recipe.problem("model.name_or_path", f"model config not reachable ({why}); {SKIPPED}",
                                          "run validate where the Hub (or the model folder) is reachable",
                                          severity="warning")]
    try:
        model = meta_model(recipe, config)
    except Exception as err:  # an architecture transformers can't build from its config alone
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return problems + [recipe.problem("model.name_or_path", f"model not built on the meta device ({reason}); "
                                          f"{SKIPPED}", "training will tell; or check the model's config",
                                          severity="warning")]
    missing = target_module_problems(recipe, model)
    if missing:
        return problems + missing
    return problems + [parameter_count(recipe, model)]


# --- packages -----------------------------------------------------------------------------------

def bitsandbytes_problem(recipe: Recipe) -> Problem | None:
    """Quantized recipe: is bitsandbytes installed, and does a quantized layer run on this machine?"""
    if not recipe.quantized:
        return None
    field = "quantization.load_in_4bit" if recipe.quantization.load_in_4bit else "quantization.load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        return recipe.problem(field, "quantization needs bitsandbytes, which is not installed",
                              "pip install bitsandbytes, or turn quantization off")
    try:
        _bitsandbytes_smoke_test(recipe.quantization.load_in_4bit, recipe.quantization.bnb_4bit_quant_type)
    except Exception as err:  # any failure here means training would fail the same way mid-load
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return recipe.problem(field, f"bitsandbytes cannot run on this machine: {reason}",
                              "install a bitsandbytes build with a backend for this device "
                              "(pip install -U bitsandbytes), or turn quantization off")
    return None


def _bitsandbytes_smoke_test(four_bit: bool, quant_type: str) -> None:
    import bitsandbytes as bnb
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if four_bit:
        layer = bnb.nn.Linear4bit(64, 64, quant_type=quant_type, compute_dtype=torch.float32)
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
    dtype = torch.float16 if device == "cuda" and not four_bit else torch.float32
    layer.to(device)(torch.randn(2, 64, device=device, dtype=dtype))


# --- config and meta model ----------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub: huggingface_hub's own retries take ~25 s to give up offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let the real request decide
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def missing_folder(recipe: Recipe) -> Problem | None:
    """A name_or_path written as a path (./x, /x, ~/x) that does not exist: a hub id never looks like that."""
    name = recipe.model.name_or_path
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return recipe.problem("model.name_or_path", f"model folder {name} not found",
                              "check the path, or give a hub id such as Qwen/Qwen2.5-0.5B")
    return None


def load_config(recipe: Recipe):
    """(config, None), or (None, why) when the config cannot be had without a network that isn't there."""
    from transformers import AutoConfig

    from lora_ns.builtin_models import resolve_model_path
    from lora_ns.model import label_kwargs

    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    kwargs = {"revision": m.revision, "trust_remote_code": m.trust_remote_code,
              **(label_kwargs(recipe) if recipe.task == "seq_cls" else {})}
    if Path(path).is_dir():
        return AutoConfig.from_pretrained(path, **kwargs), None
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, **kwargs), None
    except (OSError, ValueError):  # not cached (or not a valid hub id: the online try says which)
        pass
    if not hub_reachable():
        return None, "offline, and not in the local cache"
    try:
        return AutoConfig.from_pretrained(path, **kwargs), None
    except (OSError, ValueError) as err:  # gated, missing, or an unknown architecture
        return None, (str(err).strip().splitlines() or ["unknown error"])[0]


def meta_model(recipe: Recipe, config):
    """The model with every weight on the meta device: its structure, no memory, no download."""
    from accelerate import init_empty_weights

    from lora_ns.model import auto_model_class

    with init_empty_weights():
        return auto_model_class(recipe.task).from_config(config, trust_remote_code=recipe.model.trust_remote_code,
                                                         attn_implementation="eager")


# --- target modules and parameter counts -----------------------------------------------------------

def linear_layer_names(model) -> list[str]:
    """Short names of the linear layers (what target_modules lists), in model order."""
    import torch

    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def target_module_problems(recipe: Recipe, model) -> list[Problem]:
    """Each entry of a target_modules list must name a module, as peft matches it (exact or dotted suffix)."""
    problems = []
    module_names = [name for name, _ in model.named_modules() if name]
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        wanted = recipe.peft.options.get(key)
        if not isinstance(wanted, list):
            continue  # None, "all-linear" or a regex: peft resolves it (checked when the adapter is applied)
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in module_names)]
        if key == "modules_to_save" and recipe.task == "seq_cls":
            from lora_ns.adapters import SEQ_CLS_HEADS

            missing = [t for t in missing if t not in SEQ_CLS_HEADS]  # peft lists both head names itself
        if missing:
            problems.append(recipe.problem(
                f"peft.{key}", f"no module named {', '.join(missing)} in {type(model).__name__}",
                f"linear layers there: {', '.join(linear_layer_names(model))}"))
    return problems


def parameter_count(recipe: Recipe, model) -> Problem:
    """Apply the recipe's peft config to the meta model and report trainable / total parameters."""
    from lora_ns.adapters import apply_peft, count_parameters, peft_config

    check = recipe.model_copy(deep=True)
    if check.peft.method == "prompt_tuning":  # a TEXT init would load the tokenizer; the count is the same
        check.peft = check.peft.model_copy(update={"prompt_tuning_init": "RANDOM"})
    try:
        peft_config(recipe)  # the recipe's own values, as peft checks them (e.g. TEXT init without its text)
        model = apply_peft(model, check)
    except (ValueError, TypeError, KeyError) as err:  # e.g. r: 0, lora_dropout: 1.5 (torch's Dropout)
        from lora_ns.setup import library_problem

        return library_problem(recipe, "peft", recipe.peft.options, err, "the method's peft config docs")
    for name, param in model.named_parameters():
        if ".ranknum." in name:  # AdaLoRA's fixed rank; moving it to meta re-wraps it as trainable
            param.requires_grad_(False)
    trainable, total = count_parameters(model)
    quant = " (before quantization)" if recipe.quantized else ""
    return recipe.problem("peft.method", f"{recipe.peft.method}: trainable params {trainable:,} of {total:,}{quant} "
                          f"({100 * trainable / max(total, 1):.4f}%)", severity="info")
