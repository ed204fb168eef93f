"""Load the tokenizer and the model a recipe names: dtype, attention, bitsandbytes quantization.

transformers/peft do the work; this module turns recipe fields into their arguments, and checks first what
would otherwise fail deep inside a load (a missing flash-attn, pickle-only weights, a broken chat template).
Quantized models get peft's ``prepare_model_for_kbit_training``; under DDP each rank loads its quantized
copy onto its own device (``device_map={"": local_rank}``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora_ns.builtin_models import resolve_model_path
from lora_ns.checkpoints import is_adapter_dir
from lora_ns.config import SFT_TASKS, TORCH_DTYPES, Recipe
from lora_ns.errors import Problem, UserError, first_line, suggest
from lora_ns.pretrain import init_model, pretrain_tokenizer

# attn_implementation -> (importable module, pip package)
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3 (built from flash-attention)")}


def dtype_name(name: str) -> str:
    """bf16/fp16/fp32 as named; "auto" is bf16 on a GPU that supports it, else fp32 (CPUs run bf16 matmuls
    slowly, and fp16 training needs a GPU)."""
    import torch

    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[dtype_name(name)])


def attention_problem(recipe: Recipe) -> Problem | None:
    """A flash attention implementation whose package is not installed, as one Problem (else None)."""
    wanted = recipe.model.attn_implementation
    if wanted not in FLASH_PACKAGES:
        return None
    module, package = FLASH_PACKAGES[wanted]
    if importlib.util.find_spec(module) is not None:
        return None
    return recipe.problem("model.attn_implementation", f"{wanted} needs the {package} package",
                          f"pip install {package.split()[0]} (CUDA only), or use attn_implementation: sdpa")


def context_length(config) -> int | None:
    """A model config's context in tokens, where it gives one (GPT-2 style configs name it n_positions)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def gradient_checkpointing(recipe: Recipe) -> bool:
    """The recipe's choice, else on for quantized (memory-bound QLoRA) runs and off otherwise (and for prefix
    tuning, which it breaks: `validate.rules.checkpointing_fits_method`)."""
    t, default = recipe.training, recipe.quantized and recipe.peft.method != "prefix_tuning"
    return bool(t.get("activation_checkpointing", t.get("gradient_checkpointing", default)))


def packs(recipe: Recipe) -> bool:
    """Whether training packs rows into max_length-long blocks: the recipe's ``training.packing``, else
    lora_ns's default, on for the SFT tasks under flash attention (`setup.training_defaults`)."""
    flash = recipe.model.attn_implementation.startswith("flash_attention")
    return bool(recipe.training.get("packing", flash and recipe.task in SFT_TASKS))


def selective_checkpointing(recipe: Recipe) -> bool:
    """TRL's selective mode asked for (``{activation,gradient}_checkpointing_kwargs: {selective: true}``)."""
    t = recipe.training
    return bool((t.get("activation_checkpointing_kwargs") or t.get("gradient_checkpointing_kwargs")
                 or {}).get("selective"))


# Classification heads: trained and saved with the adapter (peft adds them to modules_to_save for SEQ_CLS)
SEQ_CLS_HEADS = ["classifier", "score"]


def quantization_config(recipe: Recipe):
    """A transformers BitsAndBytesConfig, or None. A classifier's head stays unquantized: it trains whole
    (peft's copy of a 4-bit head failed a bitsandbytes assertion, of an 8-bit one its missing state)."""
    q = recipe.quantization
    if not recipe.quantized:
        return None
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": SEQ_CLS_HEADS} if recipe.task == "seq_cls" else {}
    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    compute = recipe.model.dtype if q.bnb_4bit_compute_dtype == "auto" else q.bnb_4bit_compute_dtype
    storage = TORCH_DTYPES.get(q.bnb_4bit_quant_storage, "uint8")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(compute), bnb_4bit_quant_storage=storage,
                              **skip)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load unpickles them: they can run code
_TEMPLATE_FILE_SUFFIXES = (".jinja", ".j2", ".txt", ".jinja2")
_SAMPLE_CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def model_folder_problem(recipe: Recipe) -> Problem | None:
    """A local model folder lora_ns will not load: weights only as pickles, or custom code (auto_map)
    without model.trust_remote_code (never run by default), or a config.json that is not JSON."""
    folder, field = Path(resolve_model_path(recipe.model.name_or_path)), "model.name_or_path"
    if not folder.is_dir():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        if is_adapter_dir(folder):  # a training output: an adapter, not a model
            return recipe.problem(field, f"{folder} holds an adapter, not a model", "set peft.init_from: "
                                  f"{folder} to train it further (its base stays in model.name_or_path), "
                                  "or merge it first (python -m lora_ns.merge)")
        return recipe.problem(field, f"{folder} has no config.json", "point it at a saved model folder")
    except (OSError, ValueError) as err:
        return recipe.problem(field, f"{folder}/config.json is not valid JSON ({err})", "re-save the model")
    if isinstance(config, dict) and config.get("auto_map") and not recipe.model.trust_remote_code:
        return recipe.problem(field, f"{folder} needs its own Python code (auto_map in config.json)",
                              "set model.trust_remote_code: true only if you trust that code")
    files = [f.name for f in folder.iterdir()]
    if not any(f.endswith(".safetensors") for f in files) and any(f.endswith(PICKLE_SUFFIXES) for f in files):
        return recipe.problem(field, f"{folder} holds only pickle weights (e.g. pytorch_model.bin), which "
                              "can run code when loaded", "convert them to safetensors (save_pretrained)")
    return None


TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


def _trl_templates() -> Path | None:
    """TRL's folder of training templates (<name>_training.jinja): found, not imported (that is slow)."""
    trl = importlib.util.find_spec("trl")
    return None if trl is None or trl.origin is None else Path(trl.origin).parent / "chat_templates"


def named_template(name: str) -> Path | None:
    """A training-ready template by name: ours (``chatml``) or one TRL ships (``qwen2_5``, ``llama3``, ...:
    trl/chat_templates/<name>_training.jinja), with {% generation %} markers for assistant-only loss."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        return None
    ours = TEMPLATES_DIR / f"{name}.jinja"
    if ours.is_file():
        return ours
    theirs = folder / f"{name}_training.jinja" if (folder := _trl_templates()) else None
    return theirs if theirs and theirs.is_file() else None


def template_names() -> list[str]:
    """The names `named_template` knows."""
    theirs = _trl_templates()
    return sorted({p.stem.removesuffix("_training") for p in (
        *TEMPLATES_DIR.glob("*.jinja"), *(theirs.glob("*_training.jinja") if theirs else ()))})


def chat_template_text(recipe: Recipe) -> str:
    """model.chat_template: a shipped template's name, the file it names, or the template itself; a path
    that does not exist is an error (it would otherwise become the template text)."""
    value, field = recipe.model.chat_template or "", "model.chat_template"
    inline = "{%" in value or "{{" in value  # template text (often longer than a file name may be)
    path = named_template(value) or Path(value)
    if not inline and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(recipe.problem(field, f"cannot read {value} ({err})", "save it as UTF-8 text"))
    looks_like_path = value.endswith(_TEMPLATE_FILE_SUFFIXES) or ("/" in value or "\\" in value)
    if looks_like_path and not inline:
        raise UserError(recipe.problem(field, f"template file {value} not found",
                                       "check the path (relative to where you run the command)"))
    if not inline:  # no Jinja: every conversation would render as this same text
        raise UserError(recipe.problem(field, f"'{value}' is no template name, file or Jinja text",
                                       suggest(value, template_names(), "names", show=8)))
    return value


def checked_chat_template(recipe: Recipe, tokenizer) -> str:
    """The recipe's template, rendered once on a two-turn sample in transformers' sandboxed Jinja, so a
    broken or unsafe template is one line now, not a traceback mid-training."""
    text = chat_template_text(recipe)
    try:
        tokenizer.apply_chat_template(_SAMPLE_CHAT, chat_template=text, tokenize=False)
    except Exception as err:  # jinja2 TemplateSyntaxError/SecurityError/UndefinedError, or raise_exception()
        line = getattr(err, "lineno", None)
        reason = first_line(err)
        raise UserError(recipe.problem("model.chat_template", f"the template fails to render "
                                       f"({type(err).__name__}{f' at template line {line}' if line else ''}: "
                                       f"{reason})", "fix the Jinja template (see the tokenizer docs on chat "
                                       "templates)")) from None
    return text


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer, set up for training (`tokenizer_as_trained`)."""
    from transformers import AutoTokenizer

    m = recipe.model
    if recipe.task == "pretrain":  # pretrain hook: tiktoken names, EOS required
        return pretrain_tokenizer(recipe)
    path = resolve_model_path(m.tokenizer_name_or_path or m.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision,
                                              trust_remote_code=m.trust_remote_code)
    return tokenizer_as_trained(tokenizer, recipe)


def tokenizer_as_trained(tokenizer, recipe: Recipe | None = None, model=None, keep_template: bool = False):
    """The set-up training gives a tokenizer, and inference again: a pad token where it has none (eos, else
    unk), also as the model config's id; the recipe's chat template, which replaces the tokenizer's own
    unless `keep_template` (inference: the one a trained tokenizer was saved with)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if model is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    template = recipe.model.chat_template if recipe is not None else None
    if template and not (keep_template and tokenizer.chat_template):
        tokenizer.chat_template = checked_chat_template(recipe, tokenizer)
        chatml = named_template(template) == TEMPLATES_DIR / "chatml.jinja"
        if chatml and "<|im_end|>" in tokenizer.get_vocab():
            tokenizer.eos_token = "<|im_end|>"  # ChatML's end of turn: trained on, and where generation stops
    return tokenizer


def tokenizer_field(recipe: Recipe) -> str:
    return "model.tokenizer_name_or_path" if recipe.model.tokenizer_name_or_path else "model.name_or_path"


def vocabulary_problem(recipe: Recipe, tokenizer, embedding_rows: int) -> Problem | None:
    """Another model's tokenizer: ordinary token ids past the model's embedding rows stop training at the
    first batch that holds one. Added tokens past them (special tokens a text may never use): a warning."""
    if len(tokenizer) <= embedding_rows:
        return None
    ordinary = tokenizer.vocab_size > embedding_rows
    which = "its vocabulary" if ordinary else "with its added tokens"
    message = f"the tokenizer has {len(tokenizer):,} tokens ({which}), the model's embeddings " \
              f"{embedding_rows:,} rows"
    return recipe.problem(tokenizer_field(recipe), message, "use the tokenizer the model was trained with",
                          severity="error" if ordinary else "warning")


def eos_problem(recipe: Recipe, tokenizer) -> Problem | None:
    """A tokenizer without an EOS token (TRL ends every causal example with it, generation stops on it), or
    a training.eos_token / pad_token it does not have (TRL refuses them after the weights load)."""
    vocabulary = tokenizer.get_vocab()
    for name in ("eos_token", "pad_token"):
        if (token := recipe.training.get(name)) is not None and token not in vocabulary:
            return recipe.problem(f"training.{name}", f"the tokenizer has no token '{token}'",
                                  f"use one of its tokens (e.g. '{getattr(tokenizer, name)}'), or remove it")
    if recipe.task in ("seq_cls", "pretrain") or tokenizer.eos_token is not None:
        return None
    return recipe.problem(tokenizer_field(recipe), "the tokenizer has no EOS token, which training ends "
                          "every example with", "use the model's own tokenizer, or one with an eos_token")


def sharded_training() -> bool:
    """DeepSpeed ZeRO-3 or FSDP: they place (and shard) the weights themselves."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def label_kwargs(recipe: Recipe) -> dict[str, Any]:
    """seq_cls: the classes as id2label/label2id (model.labels, so saved configs carry class names; else
    transformers' LABEL_i). Not num_labels, which transformers checks against a checkpoint's own map of
    another length and warns of twice (validate has said it: a new head)."""
    names = recipe.model.labels or [f"LABEL_{i}" for i in range(recipe.model.num_labels or 2)]
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    m = recipe.model
    kwargs: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code,
                              "use_safetensors": True,  # never unpickle weights
                              "dtype": torch_dtype(m.dtype), "attn_implementation": m.attn_implementation}
    quant = quantization_config(recipe)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not sharded_training():  # ZeRO-3/FSDP place the weights themselves and refuse a device_map
            import torch
            from accelerate import PartialState

            # Under DDP one full quantized copy per rank, on its own GPU; else the CPU.
            gpu = torch.cuda.is_available()
            kwargs["device_map"] = {"": PartialState().local_process_index} if gpu else "cpu"
    if recipe.task == "seq_cls":  # a head saved for other classes is trained anew (validate warns, and
        kwargs.update(label_kwargs(recipe), ignore_mismatched_sizes=True)  # refuses other shapes that differ)
    return kwargs


@contextmanager
def head_loaded_next(task: str) -> Iterator[None]:
    """Around loading the base of a seq_cls adapter: hide transformers' LOAD REPORT ("classifier.weight |
    MISSING ... newly initialized"), which is wrong here because the adapter's saved head is loaded next."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if task == "seq_cls":
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def auto_model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def load_model(recipe: Recipe, tokenizer=None):
    """The base model, ready for peft (k-bit preparation applied when quantized)."""
    if recipe.task == "pretrain":  # pretrain hook: random init from the architecture config
        return init_model(recipe, tokenizer)
    problem = attention_problem(recipe) or model_folder_problem(recipe)
    if problem is not None:
        raise UserError(problem)
    path = resolve_model_path(recipe.model.name_or_path)
    model = auto_model_class(recipe.task).from_pretrained(path, **model_kwargs(recipe))
    if tokenizer is not None:
        tokenizer_as_trained(tokenizer, model=model)
    # Under ZeRO-3/FSDP QLoRA every weight must keep the one storage dtype: k-bit preparation would upcast the
    # non-quantized ones to fp32, so it is skipped there (as PEFT's FSDP-QLoRA example does).
    if recipe.quantized and not sharded_training():
        from peft import prepare_model_for_kbit_training

        checkpointing = gradient_checkpointing(recipe)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model
