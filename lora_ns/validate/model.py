"""Model checks for `validate`, from the model's config alone: no weights are read or downloaded. An
unreachable config (offline, gated) is a warning and skips the rest; a missing local folder is the rules'
error, and peft's own config checks ran in `lora_ns.setup` already."""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lora_ns.adapters import apply_peft, count_parameters, merge_blocker, prefix_generation_problem
from lora_ns.builtin_models import is_builtin, resolve_model_path
from lora_ns.checkpoints import ADAPTER_WEIGHTS, adapter_shapes, resume_problem, resume_target, shapes_differ
from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, first_line
from lora_ns.memory import FUSED_HEAD_TASKS
from lora_ns.model import (SEQ_CLS_HEADS, attention_problem, auto_model_class, context_length, dtype_name,
                           eos_problem, label_kwargs, load_tokenizer, model_folder_problem, packs,
                           tokenizer_field, vocabulary_problem)
from lora_ns.setup import library_problem, training_value
from lora_ns.validate.weights import local_folder, weights_problems

SKIPPED = "model checks skipped"


def check_model(recipe: Recipe, dry_run: bool = True, this_machine: bool = True) -> list[Problem]:
    """Problems (errors, warnings, one info line with parameter counts) found without model weights;
    `this_machine`: whether the weights fit it (`memory_problem`)."""
    problems = [p for p in (flash_problem(recipe, dry_run), bitsandbytes_problem(recipe)) if p is not None]
    if (missing := model_folder_problem(recipe)) is not None:
        return problems + [missing]
    config, why = load_config(recipe)
    if config is None and local_folder(recipe):  # what training loads, and cannot
        return problems + [recipe.problem("model.name_or_path", f"cannot load its config.json: {why}",
                                          "check config.json's model_type, or upgrade transformers")]
    if config is None:
        return problems + [recipe.problem("model.name_or_path", f"model config not reachable ({why}); "
                                          f"{SKIPPED}", "run validate where the Hub (or the model folder) is "
                                          "reachable", severity="warning")]
    try:
        from accelerate import init_empty_weights

        with init_empty_weights():  # the structure, no memory, no download
            model = auto_model_class(recipe.task).from_config(
                config, trust_remote_code=recipe.model.trust_remote_code, attn_implementation="eager")
    except Exception as err:  # an architecture transformers can't build from its config alone
        return problems + [recipe.problem("model.name_or_path", f"model not built on the meta device "
                                          f"({first_line(err)}); {SKIPPED}", "training will tell; or check "
                                          "the model's config", severity="warning")]
    problems += [p for p in (context_problem(recipe, model), router_problem(recipe, config)) if p is not None]
    problems += weights_problems(recipe, model)
    if any(p.is_error for p in problems):
        return problems
    tokenizer, _ = reachable_tokenizer(recipe)  # none: the data checks say why
    if tokenizer is not None:
        rows = model.get_input_embeddings().num_embeddings
        found = (eos_problem(recipe, tokenizer), vocabulary_problem(recipe, tokenizer, rows))
        problems += [p for p in found if p is not None]
        if any(p is not None and p.is_error for p in found):  # training cannot start: no adapter checks
            return problems
    return problems + (target_module_problems(recipe, model) or parameter_count(recipe, model, this_machine))


def router_problem(recipe: Recipe, config) -> Problem | None:
    """A router_aux_loss_coef for a model with no router: TRL's trainers refuse it as they start."""
    coef = recipe.training.get("router_aux_loss_coef")
    if not coef or hasattr(config.get_text_config(), "output_router_logits"):
        return None
    model = type(config).__name__.removesuffix("Config")
    return recipe.problem("training.router_aux_loss_coef", f"{coef}, but {model} is not a Mixture-of-Experts "
                          "model: it has no router loss to weight", "remove training.router_aux_loss_coef")


def context_problem(recipe: Recipe, model) -> Problem | None:
    """A max_length past the model's positions. Learned position embeddings (GPT-2, BERT) are indexed out of
    range by the first longer row, mid-run; rotary ones run on over positions the model never trained on.
    Packed rows are all max_length long; unpacked ones only as long as the data makes them. GRPO generates
    max_completion_length tokens after the whole prompt (TRL 1 cuts none): they must leave room for one."""
    grpo = recipe.task == "grpo"
    key = "max_completion_length" if grpo else "max_length"
    context = context_length(model.config)
    length = training_value(recipe, key) if grpo else recipe.training.get(key)
    if not (context and length and length + grpo > context):
        return None
    import torch

    tokens = model.get_input_embeddings()  # another embedding of `context` rows: positions (BERT, GPT-2)
    learned = any(isinstance(m, torch.nn.Embedding) and m is not tokens and m.num_embeddings >= context
                  for m in model.modules())
    what = ("its learned position embeddings have no row for it: training stops there" if learned else
            "its positions past that were never trained")
    if grpo:
        return recipe.problem(f"training.{key}", f"{key} {length} leaves no room for a prompt in the model's "
                              f"{context} positions: every completion that long passes them, and {what}",
                              f"set training.{key} well below {context}", "error" if learned else "warning")
    reach = "every packed row passes it" if packs(recipe) else "a row that long passes it"
    return recipe.problem("training.max_length", f"max_length {length} is longer than the model's {context} "
                          f"positions: {reach}, and {what}", f"set training.max_length: {context} or less",
                          "error" if learned else "warning")


def flash_problem(recipe: Recipe, dry_run: bool = True) -> Problem | None:
    """A flash attention package not installed. It is CUDA only: validating a GPU recipe on a machine without
    CUDA warns; with CUDA, or in train's set-up, it is the error (train stops before loading)."""
    if (problem := attention_problem(recipe)) is None or not dry_run:
        return problem
    import torch

    return problem if torch.cuda.is_available() else replace(problem, severity="warning")


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
        return recipe.problem(field, f"bitsandbytes cannot run on this machine: {first_line(err)}",
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


_TOKENIZERS: dict[str, tuple[Any, str]] = {}  # the model and data checks share one load per recipe model


def reachable_tokenizer(recipe: Recipe) -> tuple[Any, str]:
    """(the recipe's tokenizer, "") when it loads without a download, else (None, why)."""
    key = recipe.task + recipe.model.model_dump_json()
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load_tokenizer(recipe)
    return _TOKENIZERS[key]


def _load_tokenizer(recipe: Recipe) -> tuple[Any, str]:
    from huggingface_hub import try_to_load_from_cache

    m = recipe.model
    name = m.tokenizer_name_or_path or m.name_or_path
    try:
        cached = any(isinstance(try_to_load_from_cache(name, f, revision=m.revision), str)
                     for f in ("tokenizer_config.json", "tokenizer.json"))
    except Exception:  # not a valid repo id
        cached = False
    if not (is_builtin(name) or Path(name).is_dir() or cached):
        return None, f"tokenizer '{name}' is neither local nor in the HF cache"
    try:
        return load_tokenizer(recipe), ""
    except UserError:  # the recipe's own mistake (e.g. model.chat_template), not a broken download
        raise
    except Exception as err:  # from the Hub cache (a partial download): reported; training may reach it
        if not (is_builtin(name) or Path(name).is_dir()):
            return None, f"tokenizer '{name}' could not be loaded ({first_line(err)})"
        # a local folder: what training loads, and cannot
        raise UserError(model_folder_problem(recipe) or recipe.problem(
            tokenizer_field(recipe), f"cannot load the tokenizer in {name}: {first_line(err)}",
            "save the tokenizer with the model (save_pretrained), or set model.tokenizer_name_or_path"))


def hub_reachable() -> bool:
    """A quick TCP probe of the Hub: huggingface_hub's own retries take ~25 s to give up offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe proves nothing: let the real request decide
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3.0).close()
        return True
    except OSError:
        return False


def load_config(recipe: Recipe):
    """(config, None), or (None, why) when the config cannot be had (offline and not cached, gated, ...)."""
    from transformers import AutoConfig

    m = recipe.model
    path = resolve_model_path(m.name_or_path)
    offline = not Path(path).is_dir() and not hub_reachable()
    try:
        return AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                          local_files_only=offline,
                                          **(label_kwargs(recipe) if recipe.task == "seq_cls" else {})), None
    except (OSError, ValueError) as err:  # not cached offline; gated, missing, or an unknown architecture
        return None, "offline, and not in the local cache" if offline else first_line(err)


def target_module_problems(recipe: Recipe, model) -> list[Problem]:
    """Each entry of a target_modules list must name a module, as peft matches it (exact or dotted suffix)."""
    import torch

    problems, names = [], [name for name, _ in model.named_modules() if name]
    for key in ("target_modules", "feedforward_modules", "modules_to_save"):
        wanted = recipe.peft.options.get(key)
        if not isinstance(wanted, list):
            continue  # None, "all-linear" or a regex: peft resolves it (checked when the adapter is applied)
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
        if key == "modules_to_save" and recipe.task == "seq_cls":
            missing = [t for t in missing if t not in SEQ_CLS_HEADS]  # peft lists both head names itself
        if missing:
            linears = {n.rsplit(".", 1)[-1]: None for n, module in model.named_modules()
                       if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"}
            problems.append(recipe.problem(f"peft.{key}", f"no module named {', '.join(missing)} in "
                                           f"{type(model).__name__}",
                                           f"linear layers there: {', '.join(linears)}"))
    return problems


def adapter_problem(recipe: Recipe, peft_model) -> Problem | None:
    """What peft builds but the trainer or the first step refuses, seen on the meta model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if recipe.task in FUSED_HEAD_TASKS and isinstance(peft_model.get_output_embeddings(), BaseTunerLayer):
        return recipe.problem("peft.target_modules", f"an adapter on lm_head: TRL's {recipe.task} trainer "
                              "scores tokens with lm_head.weight itself, so it would never train",
                              "leave lm_head out of peft.target_modules")
    generates = recipe.peft.method == "prefix_tuning" and recipe.task != "seq_cls"
    if generates and (why := prefix_generation_problem()):
        grpo = recipe.task == "grpo"  # samples with generate: it would learn from the untuned model's answers
        return recipe.problem("peft.method", f"{why}: " + ("GRPO would learn from the untuned model's samples"
                              if grpo else "the adapter trains, but infer and evaluate cannot ask it"),
                              "use lora (or prompt_tuning)", "error" if grpo else "warning")
    if recipe.peft.method == "prefix_tuning" and recipe.task == "seq_cls":
        # peft's test before a classifier's prefix-tuning forward: its forward, or its backbone's, takes it
        base = peft_model.get_base_model()
        backbone = getattr(base, base.base_model_prefix, base)
        if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (base, backbone)):
            return recipe.problem("peft.method", "peft's prefix tuning for classification needs a forward "
                                  f"that takes past_key_values; {type(base).__name__}'s does not "
                                  "(transformers 5 names it cache)",
                                  "use lora, ia3 or prompt_tuning for seq_cls")
    if why := merge_blocker(peft_model):
        return recipe.problem("peft.lora_bias", f"{why}: lora_ns.merge cannot fold this adapter into the "
                              "model", "set peft.lora_bias: false, unless it is only used as an adapter",
                              severity="warning")
    return None


def init_from_problem(recipe: Recipe, model) -> Problem | None:
    """The adapter ``peft.init_from`` names does not fit this model (it was trained on another, or its config
    was edited): loading it would stop on a page of size mismatches. `model`: with that adapter's config."""
    if not recipe.peft.init_from or not hasattr(model, "peft_config"):
        return None
    if getattr(model.peft_config[model.active_adapter], "rank_pattern", None):  # AdaLoRA's, saved pruned to
        return None  # its ranks: peft cuts the built adapter so as it loads (not on the meta device)
    folder = Path(recipe.peft.init_from)
    if why := shapes_differ(adapter_shapes(model), [folder / ADAPTER_WEIGHTS], adapter=True):
        return recipe.problem("peft.init_from", f"{folder} does not fit this model: it holds {why}",
                              "start from an adapter trained on model.name_or_path, or remove peft.init_from")
    return None


def memory_problem(recipe: Recipe, parameters: int) -> Problem | None:
    """With no GPU, training here holds the weights in this machine's memory: weights alone larger than it are
    a warning (a laptop often validates for a GPU machine: `--gpu-memory` gives that estimate)."""
    import torch

    if torch.cuda.is_available() or not hasattr(os, "sysconf"):
        return None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    q = recipe.quantization  # bytes per weight as training loads them; 4-bit packs two in a byte
    need = parameters * (0.5 if q.load_in_4bit else 1 if q.load_in_8bit else
                         {"fp32": 4}.get(dtype_name(recipe.model.dtype), 2))
    if need <= memory:
        return None
    gib = 2 ** 30
    why = (f"its weights alone take {need / gib:,.1f} GiB, over this machine's {memory / gib:,.1f} GiB of "
           "memory, and no GPU is visible: training here runs out of memory as it loads")
    return recipe.problem("model.name_or_path", why, "train on a GPU machine (validate --gpu-memory SIZE "
                          "estimates for one), or use a smaller model or quantization", "warning")


def parameter_count(recipe: Recipe, model, this_machine: bool = True) -> list[Problem]:
    """Apply the recipe's peft config to the meta model and report trainable / total parameters (and
    whether the checkpoint an interrupted run resumes from fits it)."""
    check = recipe.model_copy(deep=True)
    if check.peft.method == "prompt_tuning":  # a TEXT init would load the tokenizer; the count is the same
        check.peft = check.peft.model_copy(update={"prompt_tuning_init": "RANDOM"})
    init = check.peft.options.get("init_lora_weights")
    if isinstance(init, str) and init != "gaussian":  # pissa, olora, corda, loftq...: computed from weights
        check.peft = check.peft.model_copy(update={"init_lora_weights": True})  # the meta model has none
    try:
        model = apply_peft(model, check)
    except (ValueError, TypeError, KeyError) as err:  # e.g. r: 0, lora_dropout: 1.5 (torch's Dropout)
        return [library_problem(recipe, "peft", recipe.peft.options, err, "the peft config docs")]
    resumed = resume_target(recipe, quiet=True)
    found = [p for p in (adapter_problem(recipe, model), resume_problem(recipe, model, resumed),
                         init_from_problem(recipe, model)) if p]
    if errors := [p for p in found if p.is_error]:
        return errors[:1]
    for name, param in model.named_parameters():
        if ".ranknum." in name:  # AdaLoRA's fixed rank; moving it to meta re-wraps it as trainable
            param.requires_grad_(False)
    trainable, total = count_parameters(model)
    quant = " (before quantization)" if recipe.quantized else ""
    found += [p for p in (this_machine and memory_problem(recipe, total),) if p]
    return found + [recipe.problem(
        "peft.method", f"{recipe.peft.method}: trainable params {trainable:,} of {total:,}{quant} "
        f"({100 * trainable / max(total, 1):.4f}%)", severity="info")]
