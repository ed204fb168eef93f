"""Load the tokenizer and the model a recipe names: dtype, attention, bitsandbytes quantization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_ns.builtin_models import resolve_model_path
from lora_ns.config import Recipe

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    """Recipe dtype name -> torch dtype; "auto" picks bf16 where the hardware supports it, else fp32."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, _DTYPES[name])


def quantization_config(recipe: Recipe):
    """A transformers BitsAndBytesConfig, or None."""
    q = recipe.quantization
    if not recipe.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = recipe.model.dtype if q.bnb_4bit_compute_dtype == "auto" else q.bnb_4bit_compute_dtype
    storage = "uint8" if q.bnb_4bit_quant_storage == "uint8" else _DTYPES[q.bnb_4bit_quant_storage]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(compute), bnb_4bit_quant_storage=storage)


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    m = recipe.model
    path = resolve_model_path(m.tokenizer_name_or_path or m.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if m.chat_template and not tokenizer.chat_template:
        template = Path(m.chat_template)
        tokenizer.chat_template = template.read_text(encoding="utf-8") if template.is_file() else m.chat_template
    return tokenizer


def model_kwargs(recipe: Recipe) -> dict[str, Any]:
    m = recipe.model
    kwargs: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code,
                              "dtype": torch_dtype(m.dtype), "attn_implementation": m.attn_implementation}
    quant = quantization_config(recipe)
    if quant is not None:
        import torch

        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    if recipe.task == "seq_cls":
        kwargs["num_labels"] = m.num_labels or len(m.labels or []) or 2
        if m.labels:
            kwargs["id2label"] = dict(enumerate(m.labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(m.labels)}
    return kwargs


def load_model(recipe: Recipe, tokenizer=None):
    """The base model, ready for peft (k-bit preparation applied when quantized)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if recipe.task == "seq_cls" else AutoModelForCausalLM
    model = auto.from_pretrained(resolve_model_path(recipe.model.name_or_path), **model_kwargs(recipe))
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(recipe.training.get("gradient_checkpointing", False)))
    return model
