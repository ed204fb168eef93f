"""The weights of a local model folder (a builtin's too), checked as `from_pretrained` will load them, from
the safetensors headers alone: no tensor is read, so it takes milliseconds on any model size."""

from __future__ import annotations

import json
from pathlib import Path

from lora_ns.builtin_models import resolve_model_path
from lora_ns.config import Recipe
from lora_ns.errors import Problem, first_line
from lora_ns.model import SEQ_CLS_HEADS


def local_folder(recipe: Recipe) -> Path | None:
    """The model folder on this machine (a builtin's too), else None (a Hub id)."""
    folder = Path(resolve_model_path(recipe.model.name_or_path))
    return folder if folder.is_dir() else None


def weight_files(folder: Path) -> list[str]:
    """The safetensors files `from_pretrained` loads from `folder`; ValueError when one is missing."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file() or not index.is_file():
        files = ["model.safetensors"]
    else:
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is not a shard index ({first_line(err)})") from None
    if missing := [f for f in files if not (folder / f).is_file()]:
        raise ValueError(f"{folder} has no {missing[0]}" + (f" (one of {len(files)} shards)" if len(files) > 1
                                                            else ": no weights"))
    return files


def weights_problems(recipe: Recipe, model) -> list[Problem]:
    """A local model's weights as training loads them, from the safetensors headers alone: none, a shard
    missing, a file cut short, a tensor of another shape than config.json builds (a config edited after
    saving, or another model's weights): each fails the load. A classifier head of another number of classes
    is a warning: training gives the recipe's classes a new head (`model.model_kwargs`)."""
    from safetensors import SafetensorError, safe_open

    folder, field = local_folder(recipe), "model.name_or_path"
    if folder is None:
        return []
    try:
        files = weight_files(folder)
    except ValueError as err:
        return [recipe.problem(field, str(err), "save or download the model again")]
    compare = not (getattr(model.config, "quantization_config", None) or converted(model))
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()} if compare else {}
    for file in files:
        try:
            with safe_open(folder / file, "pt") as weights:
                saved = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
        except (SafetensorError, OSError) as err:
            return [recipe.problem(field, f"cannot read {folder / file}: {first_line(err)}",
                                   "save or download the model again")]
        if problem := shape_problem(recipe, file, saved, built, f"{model.base_model_prefix}."):
            return [problem]
    return []


def shape_problem(recipe: Recipe, file: str, saved: dict[str, tuple], built: dict[str, tuple],
                  prefix: str) -> Problem | None:
    """The first saved tensor whose shape is not the built one (keys matched with or without the base model's
    prefix, as transformers loads a backbone's weights into a model with a head, or the reverse)."""
    for key, shape in saved.items():
        name = next((n for n in (key, prefix + key, key.removeprefix(prefix)) if n in built), None)
        if name is None or shape == built[name]:
            continue
        if recipe.task == "seq_cls" and (head := name.split(".")[0]) in SEQ_CLS_HEADS:
            return recipe.problem("model.name_or_path", f"its {head} is for {shape[0]} classes, the recipe's "
                                  f"for {built[name][0]}: training starts a new head",
                                  f"set model.num_labels: {shape[0]} to train the saved head", "warning")
        return recipe.problem("model.name_or_path", f"{file}: {key} is {list(shape)}, but config.json builds "
                              f"{list(built[name])}", "use the config.json saved with the weights")
    return None


def converted(model) -> bool:
    """Whether transformers changes tensors as it loads this model (MoE experts fused, transposes: its
    conversion mapping, which peft reads too); then, as for a quantized model, the shapes differ on disk."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # another transformers: compare nothing rather than refuse a good model
        return True
    return any(isinstance(t, WeightConverter) for t in get_model_conversion_mapping(model))
