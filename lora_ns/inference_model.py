"""Load a base model, a training output (adapter dir) or a merged dir for inference, and render prompts.

One loader for `infer`, `evaluate` and `compare`, so the three see a model the same way:

- an *adapter dir* (has ``adapter_config.json``): the base it names (or ``--base``) is loaded the way
  training loaded it (dtype, 4-bit when the recipe was QLoRA, seq_cls head size and label names from
  the saved ``recipe.yaml``), then peft applies the adapter;
- a *merged dir* or any base model (hub id, folder, ``builtin:<name>``): ``from_pretrained`` in its
  saved dtype.

Prompts are rendered as training rendered them: with the tokenizer's chat template (plus the
recipe's system prompt) unless the recipe has a ``dataset.prompt_template``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lora_ns.builtin_models import resolve_model_path
from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError

ADAPTER_CONFIG = "adapter_config.json"
RECIPE_FILE = "recipe.yaml"
MERGE_INFO = "merge_info.json"


class Prompt(NamedTuple):
    """A rendered prompt and whether the tokenizer should add its special tokens (not for chat text)."""

    text: str
    add_special_tokens: bool


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    task: str  # "causal_lm" | "seq_cls" | "cpt"
    kind: str  # "adapter" | "merged" | "base"
    path: str
    recipe: Recipe | None = None

    @property
    def device(self):
        return next(self.model.parameters()).device


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json as a dict; a file that is not a JSON object naming its peft_type is one line."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(Problem(str(path), "", f"not a readable adapter config ({str(err).splitlines()[0][:120]})",
                                "re-save the adapter, or point at the training output_dir that holds it"))
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise UserError(Problem(str(path), "peft_type", "missing: not a peft adapter config",
                                "re-save the adapter, or point at the training output_dir that holds it"))
    return config


def check_adapter_files(adapter_dir: str | Path) -> None:
    """The adapter's weights are whole safetensors (never pickles, which can run code when loaded)."""
    from lora_ns.setup import safetensors_defect

    folder = Path(adapter_dir)
    read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise UserError(Problem(str(weights), "", "not found" + (" (only a pickle adapter_model.bin, which lora_ns "
                                "does not load)" if pickled else ""), "re-save the adapter as safetensors "
                                "(save_pretrained), or point at a complete training output_dir"))
    if why := safetensors_defect(weights):
        raise UserError(Problem(str(weights), "", why, "the copy is incomplete: copy or re-save the adapter again"))


def saved_recipe(folder: str | Path) -> Recipe | None:
    """The resolved recipe that training (or merge) saved beside the weights, if any."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    from lora_ns.config import load_recipe

    return load_recipe(path)


def adapter_base(adapter_dir: str | Path, base: str | None = None, recipe: Recipe | None = None) -> str:
    """The base model to apply an adapter to: `base`, else adapter_config's base (else the recipe's), resolved.

    Training records the *resolved* path of a builtin model; when that cache folder is gone, the
    recipe's ``builtin:`` name rebuilds it.
    """
    if base:
        return resolve_model_path(base)
    named = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    gone = not named or (os.path.isabs(named) and not Path(named).exists())
    if gone and recipe is not None:
        named = recipe.model.name_or_path
    if not named:
        raise UserError(Problem(str(Path(adapter_dir) / ADAPTER_CONFIG), "base_model_name_or_path",
                                "the adapter does not name its base model", "pass --base MODEL"))
    return resolve_model_path(named)


def detect_task(path: str | Path, recipe: Recipe | None = None) -> str:
    """causal_lm / seq_cls / cpt, from the saved recipe, the adapter's task_type or the model's architecture."""
    if recipe is not None:
        return recipe.task
    if is_adapter_dir(path):
        return "seq_cls" if read_adapter_config(path).get("task_type") == "SEQ_CLS" else "causal_lm"
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(resolve_model_path(str(path))).architectures or []
    return "seq_cls" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"


def load_tokenizer_for(path: str, recipe: Recipe | None, task: str, trust_remote_code: bool = False):
    """Tokenizer saved with the model; pad = eos when missing; left padding for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # as lora_ns.model.load_tokenizer did in training
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    template = recipe.model.chat_template if recipe is not None else None
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = Path(template).read_text(encoding="utf-8") if Path(template).is_file() else template
    tokenizer.padding_side = "right" if task == "seq_cls" else "left"
    return tokenizer


def _adapter_kwargs(recipe: Recipe | None, dtype: str | None) -> dict[str, Any]:
    """from_pretrained kwargs for an adapter's base: as training loaded it (lora_ns.model.model_kwargs)."""
    if recipe is None:
        return {"dtype": _dtype(dtype)}
    from lora_ns.model import model_kwargs

    kwargs = model_kwargs(recipe)
    if dtype:
        kwargs["dtype"] = _dtype(dtype)
    return kwargs


def _dtype(name: str | None):
    if not name or name == "auto":
        return "auto"
    from lora_ns.model import torch_dtype

    return torch_dtype(name)


def load_for_inference(path: str, base: str | None = None, recipe: Recipe | None = None,
                       dtype: str | None = None) -> LoadedModel:
    """Load `path` (adapter dir, merged dir, folder, hub id or builtin:name) in eval mode.

    A model that cannot be found or read is a one-line `UserError`, not a traceback.
    """
    local = Path(path)
    if not local.exists() and path.startswith((os.sep, ".", "~")):
        raise UserError(Problem(path, "--model", "model folder not found", "check the path (a training output_dir?)"))
    try:
        return _load(path, base, recipe, dtype)
    except OSError as err:  # what from_pretrained raises for a missing / unreachable / incomplete model
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(Problem(path, "--model", f"cannot load the model: {reason}",
                                "check the path or hub id (offline, only local folders and builtin: models load)"))


def _load(path: str, base: str | None, recipe: Recipe | None, dtype: str | None) -> LoadedModel:
    import torch

    from lora_ns.model import auto_model_class, head_loaded_next

    local = Path(path)
    recipe = recipe or (saved_recipe(local) if local.is_dir() else None)
    task = detect_task(path, recipe)
    trust = bool(recipe and recipe.model.trust_remote_code)
    if is_adapter_dir(local):
        from peft import PeftModel

        check_adapter_files(local)
        base_path = adapter_base(local, base, recipe)
        kwargs = _adapter_kwargs(recipe, dtype)
        with head_loaded_next(task):
            model = auto_model_class(task).from_pretrained(base_path, **kwargs)
        model = PeftModel.from_pretrained(model, str(local))
        tokenizer_path, kind = (str(local) if (local / "tokenizer_config.json").is_file() else base_path), "adapter"
        quantized = "quantization_config" in kwargs
    else:
        resolved = resolve_model_path(path)
        model = auto_model_class(task).from_pretrained(resolved, dtype=_dtype(dtype), trust_remote_code=trust)
        tokenizer_path, kind, quantized = resolved, "merged" if (local / MERGE_INFO).is_file() else "base", False
    tokenizer = load_tokenizer_for(tokenizer_path, recipe, task, trust)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if torch.cuda.is_available() and not quantized:
        model.to("cuda")
    model.eval()
    return LoadedModel(model, tokenizer, task, kind, path, recipe)


def _chat(tokenizer, messages: list[dict[str, str]]) -> Prompt:
    if not tokenizer.chat_template:
        raise UserError(Problem("<prompt>", "messages", "the model's tokenizer has no chat template",
                                "give plain prompts, or set model.chat_template in the recipe"))
    return Prompt(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), False)


def render_prompt(tokenizer, prompt: str | list[dict[str, str]], recipe: Recipe | None = None) -> Prompt:
    """A user prompt (or a message list ending on a user turn) as the text the model continues.

    With a recipe this is `lora_ns.data.render` (what training saw, system prompt included);
    without one, the chat template when the tokenizer has one, else the bare text.
    """
    if recipe is None:
        if isinstance(prompt, list) or tokenizer.chat_template:
            return _chat(tokenizer, prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}])
        return Prompt(prompt, True)
    from lora_ns.data.render import format_prompt, render, uses_chat_template

    if isinstance(prompt, list):
        return _chat(tokenizer, render({"messages": prompt}, recipe, tokenizer)["messages"])
    if recipe.task == "cpt":
        return Prompt(prompt, True)
    if uses_chat_template(recipe, tokenizer):
        return _chat(tokenizer, render({"prompt": prompt, "completion": ""}, recipe, tokenizer)["prompt"])
    return Prompt(format_prompt(prompt, recipe), True)
