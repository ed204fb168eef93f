"""Recipe schema: a YAML file maps onto these typed sections, key for key.

`model`, `quantization` and `dataset` are our own (pydantic, unknown keys rejected); `peft` is a
`method` plus the fields of that method's peft config class; `training` is passed through to TRL's
`SFTConfig` (causal_lm, cpt, pretrain: lora_ns.pretrain), `DPOConfig`, ... (lora_ns.preference) or
transformers' `TrainingArguments` (seq_cls), so users write the argument names they already know.
`load_recipe` applies command-line overrides, checks every key, and raises one `UserError` listing every
problem with its field path and YAML line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from lora_ns.errors import Problem, UserError, fail, suggest
from lora_ns.hf_fields import (DROPPED_TRAINING_KEYS, PEFT_TYPES, TRL_BOOL_VALUES, coerce, peft_fields,
                               training_fields)
from lora_ns.yaml_reader import read_yaml

Task = Literal["causal_lm", "seq_cls", "cpt", "pretrain", "dpo", "orpo", "kto", "grpo"]
TASKS = get_args(Task)
SFT_TASKS = ("causal_lm", "cpt", "pretrain")  # trained by TRL's SFTTrainer
# a recipe's dtype names -> torch's (lora_ns.model.torch_dtype); "auto" picks one (lora_ns.model.dtype_name)
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_DTYPE_SPELLINGS = {**{name: short for short, name in TORCH_DTYPES.items()}, "half": "fp16", "float": "fp32"}


def _short_dtype(value: Any) -> Any:
    """torch's and HF configs' spellings (bfloat16, torch.float16, half) as the recipe's short names."""
    return _DTYPE_SPELLINGS.get(value.removeprefix("torch."), value) if isinstance(value, str) else value


DType = Annotated[Literal[("auto", *TORCH_DTYPES)], BeforeValidator(_short_dtype)]
StorageDType = Annotated[Literal[("uint8", *TORCH_DTYPES)], BeforeValidator(_short_dtype)]
PeftMethod = Literal[(*PEFT_TYPES, "full")]  # the peft methods (hf_fields.PEFT_TYPES), or a full fine-tune


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which model to load, and how."""

    name_or_path: str = Field(description="hub id, local folder, or builtin:<name> (lora_ns.builtin_models)")
    revision: str | None = None
    tokenizer_name_or_path: str | None = None
    dtype: DType = "auto"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = False
    # le: transformers names each class in the config (10^6: 0.6 s, 200 MB); 10^8 exhausted memory in validate
    num_labels: int | None = Field(default=None, ge=1, le=1_000_000, description="seq_cls: classes")
    labels: list[str] | None = Field(default=None, description="seq_cls: class names, index = label id")
    chat_template: str | None = Field(default=None, description="chatml (or a TRL training template name), a "
                                      ".jinja path, or the template text; replaces the tokenizer's own")
    config: str | None = Field(default=None, description="pretrain: architecture preset, folder or hub id")


class QuantizationConfig(_Section):
    """bitsandbytes settings; names follow transformers' BitsAndBytesConfig."""

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: DType = "auto"
    bnb_4bit_quant_storage: StorageDType = "uint8"


class PeftSection(BaseModel):
    """`method` plus any field of that method's peft config (LoraConfig, IA3Config, ...)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    method: PeftMethod = "lora"
    init_from: str | None = Field(default=None, description="adapter folder to continue training from "
                                  "(its own config is used; distinct from resuming a run)")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetConfig(_Section):
    """Where the data comes from and how rows become training examples."""

    path: str = Field(min_length=1, description="hub id, local file/glob/folder, or sample:<name> for a "
                      "bundled sample")
    name: str | None = Field(default=None, description="hub dataset config name")
    split: str = "train"
    revision: str | None = None
    data_format: Literal["json", "csv", "tsv", "parquet", "text"] | None = None
    formatter: str = "prompt_completion"
    columns: dict[str, str] = Field(default_factory=dict, description="formatter field -> column in the data")
    prompt_template: str | None = None
    system_prompt: str | None = None
    pairs: bool | None = Field(default=None, description="seq_cls: rows are sentence pairs (default: as "
                               "the first row is); the run saves what it trained on, for inference")
    val_split: str | float | None = Field(default=None, description="split name, or a held-out fraction")
    streaming: bool = False
    max_samples: int | None = Field(default=None, ge=1)
    seed: int = Field(default=42, ge=0, lt=2 ** 32)  # numpy seeds the split and shuffles: 0..2**32-1


class Recipe(_Section):
    task: Task = "causal_lm"
    model: ModelConfig
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    peft: PeftSection = Field(default_factory=PeftSection)
    dataset: DatasetConfig
    training: dict[str, Any] = Field(default_factory=dict)

    # Not part of the schema: where it came from, for messages and the saved copy.
    source: str = Field(default="<recipe>", exclude=True)
    lines: dict[str, int] = Field(default_factory=dict, exclude=True)

    def problem(self, field: str, message: str, fix: str = "", severity: str = "error") -> Problem:
        return Problem(self.source, field, message, fix, self.lines.get(field), severity)

    @property
    def output_dir(self) -> str:
        return str(self.training.get("output_dir") or f"outputs/{Path(self.source).stem}")

    @property
    def quantized(self) -> bool:
        return self.quantization.load_in_4bit or self.quantization.load_in_8bit

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "quantization": QuantizationConfig,
                                        "peft": PeftSection, "dataset": DatasetConfig}
# peft fields that lora_ns sets itself from the recipe.
PEFT_MANAGED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                "revision", "inference_mode"}


# --- overrides ----------------------------------------------------------------------------------

REMOVE = object()  # an override's value that drops the key (``~training.max_length``)


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value``, ``--key.sub value`` and ``--key.sub=value`` into (path, value), and
    ``~key.sub`` (Hydra's spelling) into (path, `REMOVE`): the recipe's key is dropped.

    Values stay text here: `apply_overrides` reads them as YAML (``true``, ``3``, ``[a, b]``), or as typed for
    a text field. A key with no dot is looked up in the sections when `apply_overrides` runs.
    """
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("~") and "=" not in arg:
            pairs.append((arg[1:], REMOVE))
            i += 1
            continue
        dashed = arg.startswith("--")
        key, eq, raw = (arg[2:] if dashed else arg).partition("=")
        if dashed and not eq:
            followed = i + 1 < len(args) and not args[i + 1].startswith("--")
            i, raw = (i + 1, args[i + 1]) if followed else (i, "true")
        elif not eq:
            raise fail("<command line>", arg, "not an override", "write key.sub=value or --key.sub value")
        pairs.append((key.replace("-", "_") if dashed else key, raw))
        i += 1
    return pairs


def _known_keys(section: str, data: dict[str, Any]) -> set[str]:
    if section == "training":
        return set(training_fields(data.get("task", "causal_lm")))
    if section == "peft":
        method = (data.get("peft") or {}).get("method", "lora")
        return {"method", "init_from", *peft_fields(method)} - PEFT_MANAGED
    return set(SECTIONS[section].model_fields)


def _override_value(path: list[str], raw: str) -> Any:
    """A text field of our sections (a prompt template, a path) takes the text as typed, ``null`` aside: YAML
    reads 'Q: {prompt}' as a mapping, a '#' as a comment, and folds a newline into a space."""
    field = SECTIONS[path[0]].model_fields.get(path[-1]) if len(path) == 2 and path[0] in SECTIONS else None
    if field is not None and field.annotation in (str, str | None) and raw not in ("null", "~"):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> None:
    """Set each override (text from `parse_overrides`) into the raw recipe dict (before validation);
    `REMOVE` drops the key."""
    for key, value in overrides:
        path = key.split(".")
        if len(path) == 1 and key != "task":
            removing = value is REMOVE
            owners = [s for s in (*SECTIONS, "training")
                      if key in ((data.get(s) or {}) if removing else _known_keys(s, data))]
            if len(owners) > 1 or not (owners or removing):  # nothing to remove: told below
                why = f"is in several sections ({', '.join(owners)})" if owners else "is not a recipe field"
                raise fail("<command line>", key, why, "write it as section.field=value")
            path = [*owners, key]
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        if value is not REMOVE:
            node[path[-1]] = _override_value(path, value)
        elif node.pop(path[-1], REMOVE) is REMOVE:
            raise fail("<command line>", f"~{key}", "not in the recipe: nothing to remove",
                       "check the key's name")


# --- validation ---------------------------------------------------------------------------------

def _check_sections(data: dict[str, Any], source: str, lines: dict[str, int]) -> list[Problem]:
    """Unknown keys anywhere in the recipe, each with the closest valid key; training/peft values checked (and
    coerced in place) against the HF dataclass annotations. Type problems are listed after the key ones."""
    problems, typed = [], []
    top = {"task", *SECTIONS, "training"}
    for key in data:
        if key not in top:
            fix = suggest(key, sorted(top), "valid sections")
            problems.append(Problem(source, key, "unknown section", fix, lines.get(key)))
    for section in (*SECTIONS, "training"):
        body = data.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(Problem(source, section, f"must be a mapping, got {type(body).__name__}",
                                    "indent its fields under it", lines.get(section)))
            continue
        known = _known_keys(section, data)
        fields = (training_fields(data.get("task", "causal_lm")) if section == "training"
                  else peft_fields(body.get("method", "lora")) if section == "peft" else {})
        for key, value in body.items():
            path = f"{section}.{key}"
            if section in ("training", "peft") and key.endswith("_strategy") and value is False:
                body[key] = value = "no"  # YAML 1.1 reads a bare `no` as false
            if section == "training" and isinstance(value, bool) and key in TRL_BOOL_VALUES:
                body[key] = value = TRL_BOOL_VALUES[key][value]
            if key in fields and value is not None:
                ok, body[key] = coerce(value, fields[key])
                if not ok:
                    typed.append(Problem(source, path, f"expected {fields[key]}, got {value!r}",
                                         "fix the value's type", lines.get(path)))
            if key in known:
                continue
            if section == "peft" and key in PEFT_MANAGED:
                msg, fix = "is set by lora_ns", "remove it; it is derived from the recipe"
            elif section == "training" and key in DROPPED_TRAINING_KEYS:
                msg, fix = "not a field of this transformers/TRL version", DROPPED_TRAINING_KEYS[key]
            elif section == "training" and (tasks := [t for t in TASKS if key in training_fields(t)]):
                msg = f"not a field for task '{data.get('task', 'causal_lm')}' (only for {', '.join(tasks)})"
                fix = f"remove training.{key} (on the command line: ~training.{key})"
            else:
                method = body.get("method", "lora") if section == "peft" else None
                msg = f"unknown field for peft method '{method}'" if method else "unknown field"
                fix = suggest(key, known, "valid keys", show=12)
            problems.append(Problem(source, path, msg, fix, lines.get(path)))
    return problems + typed


def _pydantic_problems(err: ValidationError, source: str, lines: dict[str, int]) -> list[Problem]:
    problems = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        if e["type"] == "missing":
            msg, fix = "is required", "add it (see recipes/template.yaml)"
        elif e["type"] == "literal_error":
            msg, fix = f"got {e['input']!r}", e["msg"].replace("Input should be", "use")
        else:
            msg, fix = f"{e['msg']} (got {e['input']!r})", "fix the value"
        problems.append(Problem(source, path, msg, fix, lines.get(path)))
    return problems


# Paths. "~/x" in a recipe reaches no shell (to transformers a Hub id; TrainingArguments made a "~" folder).
# A relative local model, adapter or data path is made absolute: infer, merge and evaluate read it from the
# saved recipe and adapter_config.json's base, often run from another folder.
HOME_PATHS = {"model": ("name_or_path", "tokenizer_name_or_path", "chat_template", "config"),
              "dataset": ("path", "val_split"), "peft": ("init_from",),
              "training": ("output_dir", "deepspeed", "chat_template_path", "resume_from_checkpoint")}
ANCHORED = {"name_or_path", "tokenizer_name_or_path", "config", "init_from", "path"}


def _resolve_paths(data: dict[str, Any]) -> None:
    for section, names in HOME_PATHS.items():
        body = data.get(section)
        for name in names if isinstance(body, dict) else ():
            if isinstance(value := body.get(name), str) and value.startswith("~"):
                body[name] = value = os.path.expanduser(value)
            if name in ANCHORED and isinstance(value, str) and os.path.exists(value):
                body[name] = os.path.abspath(value)


def parse_recipe(data: dict[str, Any], source: str = "<recipe>",
                 lines: dict[str, int] | None = None) -> Recipe:
    """Validate a raw recipe dict into a `Recipe` (schema only; cross-field rules: lora_ns.validate.rules)."""
    lines = lines or {}
    if "task" in data and data["task"] not in TASKS:
        raise fail(source, "task", f"got {data['task']!r}", suggest(str(data["task"]), TASKS),
                   lines.get("task"))
    model = data.get("model")  # pretrain hook: no weights, so the architecture names the model
    if data.get("task") == "pretrain" and isinstance(model, dict) and "name_or_path" not in model:
        model["name_or_path"] = str(model.get("config") or "")
    _resolve_paths(data)
    problems = _check_sections(data, source, lines)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:  # unknown keys and non-mapping sections are already reported above
        seen = {p.field for p in problems}
        problems += [p for p in _pydantic_problems(err, source, lines)
                     if p.field not in seen and p.field.split(".")[0] not in seen]
    if problems:
        raise UserError(problems)
    recipe.source, recipe.lines = source, lines
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file, apply command-line overrides, and validate its schema."""
    data, lines = read_yaml(path)
    apply_overrides(data, parse_overrides(overrides or []))
    return parse_recipe(data, str(path), lines)
