"""Launch checks for ``validate --accelerate-config``: recipe settings that clash with DDP/DeepSpeed/FSDP.

The accelerate config is read with accelerate's own loader (`load_config_from_file`), so a file
`accelerate launch` would reject is rejected here the same way. Beyond that loader, the keys inside
``deepspeed_config`` / ``fsdp_config`` are checked against `accelerate launch`'s own options: accelerate
copies them onto its arguments without looking, so a misspelled one is silently ignored there.

Then each rule (a small function of the recipe and the config) reports a combination known to fail
or to do something other than what the user asked for. Errors are combinations that crash or save
a useless adapter; warnings depend on the machine the check runs on (GPU count).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError
from lora_ns.yaml_reader import parse_yaml


@dataclass(frozen=True)
class LaunchConfig:
    """An accelerate config file as accelerate reads it, plus its YAML line numbers for messages."""

    path: str
    data: dict[str, Any]  # accelerate's ClusterConfig, as a dict (enums as their string values)
    lines: dict[str, int] = field(default_factory=dict)

    def problem(self, key: str, message: str, fix: str = "", severity: str = "error") -> Problem:
        return Problem(self.path, key, message, fix, self.lines.get(key), severity)

    @property
    def kind(self) -> str:
        return str(self.data.get("distributed_type", "NO"))

    @property
    def ds(self) -> dict[str, Any]:
        return self.data.get("deepspeed_config") or {}

    @property
    def fsdp(self) -> dict[str, Any]:
        return self.data.get("fsdp_config") or {}

    @property
    def zero_stage(self) -> int | None:
        return int(self.ds.get("zero_stage", 2)) if self.kind == "DEEPSPEED" else None

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def is_fsdp(self) -> bool:
        return self.kind == "FSDP"

    @property
    def shards_params(self) -> bool:
        """ZeRO-3 and FSDP split every weight across ranks (ZeRO-2 and DDP keep a full copy per GPU)."""
        return self.zero3 or self.is_fsdp

    @property
    def mixed_precision(self) -> str | None:
        value = self.data.get("mixed_precision")
        return None if value is None else str(value).lower()


def _flag(value: Any) -> bool:
    """accelerate keeps these as strings or bools ("true", True, "yes")."""
    return str(value).strip().lower() in ("true", "1", "yes")


def _suggest(word: str, options: set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else "see accelerate_configs/README.md for the keys accelerate knows"


CONFIGS_DIR = Path(__file__).resolve().parents[2] / "accelerate_configs"


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or the name of a shipped config (``fsdp2`` -> accelerate_configs/fsdp2.yaml)."""
    path = Path(name)
    shipped = CONFIGS_DIR / f"{path.stem}.yaml"
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        return shipped
    return path


def _read_mapping(source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's raw mapping and the YAML line of each key; unreadable or malformed files are a `UserError`."""
    try:
        text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(Problem(source, "", "accelerate config not found",
                                f"pick one from accelerate_configs/ ({', '.join(shipped_configs())})"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(source, "", f"cannot read accelerate config: {err}", "save it as UTF-8 text"))
    is_json = source.endswith(".json")
    try:
        raw, lines = (json.loads(text), {}) if is_json else parse_yaml(text, source)
    except json.JSONDecodeError as err:
        raise UserError(Problem(source, "", f"invalid JSON: {err.msg}", "fix the syntax there", err.lineno))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(Problem(source, "", f"invalid YAML: {reason}", "fix the indentation/quoting there",
                                mark.line + 1 if mark else None))
    if not isinstance(raw, dict):
        raise UserError(Problem(source, "", "an accelerate config must be a mapping of keys",
                                "start from one in accelerate_configs/"))
    return raw, lines


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def read_launch_config(path: str | Path) -> LaunchConfig:
    """Load an accelerate config with accelerate's own loader; any failure is a one-line `UserError`."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    source = str(resolve_config_path(path))
    raw, lines = _read_mapping(source)
    try:
        loaded = load_config_from_file(source)
    except ValueError as err:
        raise UserError(_loader_problems(source, raw, lines, str(err), set(ClusterConfig.__dataclass_fields__)))
    except (TypeError, KeyError, AttributeError) as err:
        raise UserError(Problem(source, "", f"accelerate cannot read it: {err}",
                                "start from one in accelerate_configs/"))
    data = {k: getattr(v, "value", v) for k, v in vars(loaded).items()}
    return LaunchConfig(source, data, lines)


def _loader_problems(source: str, raw: dict, lines: dict[str, int], message: str, known: set[str]) -> list[Problem]:
    """Turn accelerate's ValueError into problems that name the key."""
    if "unknown keys" in message:
        extra = [k for k in raw if k not in known and k not in ("fp16", "dynamo_backend")]  # both converted
        return [Problem(source, k, "unknown key (accelerate refuses the file)", _suggest(k, known), lines.get(k))
                for k in extra] or [Problem(source, "", message.splitlines()[0])]
    if "distributed_type" in message or "DistributedType" in message:
        from accelerate.utils import DistributedType

        return [Problem(source, "distributed_type", message.splitlines()[0],
                        f"use one of: {', '.join(t.value for t in DistributedType)}", lines.get("distributed_type"))]
    return [Problem(source, "", message.splitlines()[0], "start from one in accelerate_configs/")]


# --- the config file on its own ---------------------------------------------------------------------

@cache
def launch_options() -> dict[str, Any]:
    """`accelerate launch`'s options by name (dest -> argparse action)."""
    from accelerate.commands.launch import launch_command_parser

    return {a.dest: a for a in launch_command_parser()._actions}


FSDP1_ONLY = ("fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_backward_prefetch", "fsdp_forward_prefetch",
              "fsdp_sharding_strategy")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


# accelerate copies these sections' keys onto `accelerate launch` options: (prefix it adds, option names).
NESTED_SECTIONS = {"deepspeed_config": ("", ("zero", "offload_", "deepspeed_", "gradient_")),
                   "fsdp_config": ("fsdp_", ("fsdp_",))}


def nested_key_problems(cfg: LaunchConfig) -> Iterator[Problem]:
    """Keys under deepspeed_config / fsdp_config that accelerate launch would silently ignore."""
    options = launch_options()
    for section, (prefix, families) in NESTED_SECTIONS.items():
        known = {name for name in options if name.startswith(families)}
        for key, value in (cfg.data.get(section) or {}).items():
            name, path = (key if key.startswith(prefix) else prefix + key), f"{section}.{key}"
            if name not in known:
                yield cfg.problem(path, "unknown key (accelerate launch would silently ignore it)",
                                  _suggest(name, known))
            elif options[name].choices and str(value) not in options[name].choices:
                yield cfg.problem(path, f"got {value!r}", f"use one of: {', '.join(options[name].choices)}")


def value_problems(cfg: LaunchConfig) -> Iterator[Problem]:
    """Values accelerate only rejects once the job has started on every node."""
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE

    precision = launch_options()["mixed_precision"].choices
    if cfg.mixed_precision is not None and cfg.mixed_precision not in precision:
        yield cfg.problem("mixed_precision", f"got {cfg.mixed_precision!r}", f"use one of: {', '.join(precision)}")
    if cfg.kind == "DEEPSPEED":
        if str(cfg.ds.get("zero_stage", 2)) not in ("0", "1", "2", "3"):
            yield cfg.problem("deepspeed_config.zero_stage", f"got {cfg.ds['zero_stage']!r}", "use 0, 1, 2 or 3")
        for key in ("offload_optimizer_device", "offload_param_device"):
            if key in cfg.ds and str(cfg.ds[key]).lower() not in OFFLOAD_DEVICES:
                yield cfg.problem(f"deepspeed_config.{key}", f"got {cfg.ds[key]!r}",
                                  f"use one of: {', '.join(OFFLOAD_DEVICES)}")
        if "offload_param_device" in cfg.ds and str(cfg.ds["offload_param_device"]) != "none" and not cfg.zero3:
            yield cfg.problem("deepspeed_config.offload_param_device", "parameter offload needs ZeRO stage 3",
                              "set zero_stage: 3, or offload_param_device: none")
    if cfg.is_fsdp:
        version = str(cfg.fsdp.get("fsdp_version", 1))
        policy = cfg.fsdp.get("fsdp_auto_wrap_policy")
        if policy is not None and policy not in FSDP_AUTO_WRAP_POLICY:
            yield cfg.problem("fsdp_config.fsdp_auto_wrap_policy", f"got {policy!r}",
                              f"use one of: {', '.join(FSDP_AUTO_WRAP_POLICY)}")
        kinds = FSDP2_STATE_DICT_TYPE if version == "2" else FSDP_STATE_DICT_TYPE
        state = cfg.fsdp.get("fsdp_state_dict_type")
        if state is not None and state not in kinds:
            yield cfg.problem("fsdp_config.fsdp_state_dict_type", f"got {state!r} for FSDP{version}",
                              f"use one of: {', '.join(kinds)}")
        if version == "2":
            for key in FSDP1_ONLY:
                if key in cfg.fsdp:
                    yield cfg.problem(f"fsdp_config.{key}", "obsolete in FSDP2: accelerate drops it",
                                      "remove it (FSDP2 always uses the original parameters)", "warning")
        elif version == "1":
            yield cfg.problem("fsdp_config.fsdp_version", "FSDP1 is deprecated in accelerate 1.x",
                              "set fsdp_version: 2 (see accelerate_configs/fsdp2.yaml)", "warning")


# --- the recipe with the config -----------------------------------------------------------------------

LaunchRule = Callable[[Recipe, LaunchConfig], Iterator[Problem]]


def training_dtype(r: Recipe, cfg: LaunchConfig) -> str | None:
    """The dtype the weights train in: the recipe's model.dtype, else its/the config's mixed precision."""
    if r.model.dtype != "auto":
        return r.model.dtype
    if r.training.get("bf16"):
        return "bf16"
    if r.training.get("fp16"):
        return "fp16"
    return cfg.mixed_precision if cfg.mixed_precision in ("bf16", "fp16") else None


def eight_bit_not_shardable(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    if r.quantization.load_in_8bit and cfg.kind in ("DEEPSPEED", "FSDP"):
        yield r.problem("quantization.load_in_8bit", f"8-bit bitsandbytes models cannot be trained with "
                        f"{cfg.kind} ({cfg.path})", "use load_in_4bit (QLoRA) with a matching "
                        "bnb_4bit_quant_storage, or accelerate_configs/multi_gpu.yaml (DDP)")


def quant_storage_matches_dtype(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """ZeRO-3/FSDP flatten all parameters into one buffer per dtype: packed 4-bit weights must be stored in the
    same dtype as the rest of the model, or sharding fails (QLoRA + FSDP/ZeRO-3 recipe in the PEFT docs)."""
    if not (r.quantization.load_in_4bit and cfg.shards_params):
        return
    storage, dtype = r.quantization.bnb_4bit_quant_storage, training_dtype(r, cfg)
    how = "ZeRO-3" if cfg.zero3 else "FSDP"
    if dtype is None:
        yield r.problem("model.dtype", f"4-bit + {how}: the training dtype must be fixed to match the quant storage",
                        "set model.dtype: bf16 and quantization.bnb_4bit_quant_storage: bf16")
    elif storage != dtype:
        yield r.problem("quantization.bnb_4bit_quant_storage", f"is {storage} but the model trains in {dtype}: "
                        f"{how} cannot shard 4-bit weights stored in another dtype ({cfg.path})",
                        f"set quantization.bnb_4bit_quant_storage: {dtype}")


def zero3_qlora_init_flag(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    if cfg.zero3 and r.quantization.load_in_4bit and not _flag(cfg.ds.get("zero3_init_flag", False)):
        yield cfg.problem("deepspeed_config.zero3_init_flag", "QLoRA with ZeRO-3 needs zero3_init_flag: true "
                          "(the 4-bit model is loaded straight into shards)", "set zero3_init_flag: true "
                          "(see accelerate_configs/deepspeed_zero3_qlora.yaml)")


def zero3_saves_adapter(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    if cfg.zero3 and not _flag(cfg.ds.get("zero3_save_16bit_model", False)):
        yield cfg.problem("deepspeed_config.zero3_save_16bit_model", "without it ZeRO-3 cannot gather the sharded "
                          "weights, so the saved adapter would be empty", "set zero3_save_16bit_model: true")


def deepspeed_values_match(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """Values set in both places must agree, or the HF DeepSpeed integration stops at start-up."""
    if cfg.kind != "DEEPSPEED":
        return
    pairs = (("gradient_accumulation_steps", "gradient_accumulation_steps", 1),
             ("gradient_clipping", "max_grad_norm", 1.0))
    for ds_key, recipe_key, default in pairs:
        value = cfg.ds.get(ds_key)
        if value in (None, "auto"):
            continue
        wanted = r.training.get(recipe_key, default)
        if float(value) != float(wanted):
            yield r.problem(f"training.{recipe_key}", f"is {wanted} but {cfg.path} sets {ds_key}: {value}",
                            f"make them agree, or remove {ds_key} from the accelerate config "
                            "(it then follows the recipe)")


def fsdp_checkpointing(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """Reentrant checkpointing re-runs forward inside backward, where FSDP's hooks do not expect it.
    transformers 5 defaults to use_reentrant: false, so only an explicit true is a problem."""
    from lora_ns.model import gradient_checkpointing  # the recipe's choice, or lora_ns's default for it

    if not (cfg.is_fsdp and gradient_checkpointing(r)):
        return
    t = r.training
    field = f"training.{'activation' if 'activation_checkpointing' in t else 'gradient'}_checkpointing"
    if _flag(cfg.fsdp.get("fsdp_activation_checkpointing", False)):
        yield r.problem(field, f"{cfg.path} already sets fsdp_activation_checkpointing",
                        f"use one of them (set {field}: false)")
        return
    for name in ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"):
        if (t.get(name) or {}).get("use_reentrant"):
            yield r.problem(f"training.{name}", "FSDP with gradient checkpointing needs use_reentrant: false "
                            "(reentrant checkpointing breaks FSDP's gradient hooks)",
                            f"set training.{name}: {{use_reentrant: false}}")


def trainer_precision(r: Recipe) -> str | None:
    """What lora_ns.train sets on the Trainer: "bf16"/"fp16" (then the launcher's mixed_precision is ignored),
    "off" when the recipe turns both off explicitly (then the launcher's value is used), None when it
    depends on the machine (dtype auto) or the recipe leaves it to the launcher (fp32 weights)."""
    t, dtype = r.training, r.model.dtype
    flags = {name: t.get(name, None if dtype == "auto" else dtype == name) for name in ("fp16", "bf16")}
    on = [name for name, value in flags.items() if value]
    if on:
        return on[0]
    return "off" if ("bf16" in t or "fp16" in t) and None not in flags.values() else None


def mixed_precision_agrees(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """transformers takes the Trainer's bf16/fp16 flags over the launcher's mixed_precision without a word."""
    ours, theirs = trainer_precision(r), cfg.mixed_precision
    if ours is None or theirs is None:
        return
    if ours == "off" and theirs != "no":
        field = "training.bf16" if "bf16" in r.training else "training.fp16"
        yield r.problem(field, f"the recipe turns mixed precision off but {cfg.path} says mixed_precision: "
                        f"{theirs}, which then applies", "set mixed_precision: no in the accelerate config, "
                        "or drop the flag from the recipe")
    elif ours not in ("off", theirs):
        field = f"training.{ours}" if ours in r.training else "model.dtype"
        yield r.problem(field, f"the recipe trains in {ours} but {cfg.path} says mixed_precision: {theirs} "
                        "(the recipe would win silently)", f"set mixed_precision: {ours} in the accelerate config, "
                        "or change the recipe")


def visible_gpus(cfg: LaunchConfig) -> int:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = cfg.data.get("gpu_ids")
    if ids not in (None, "all") and count:
        count = min(count, len([i for i in str(ids).split(",") if i.strip()]))
    return count


def processes_fit_gpus(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """A warning: the config may well be meant for another machine than the one validating it."""
    if _flag(cfg.data.get("use_cpu", False)):
        return
    total, machines = int(cfg.data.get("num_processes") or 1), max(int(cfg.data.get("num_machines") or 1), 1)
    per_machine = total // machines if total > 0 else 0
    gpus = visible_gpus(cfg)
    if per_machine > gpus:
        seen = f"this machine sees {gpus} GPU{'s' if gpus != 1 else ''}"
        yield cfg.problem("num_processes", f"{per_machine} processes per machine but {seen}",
                          "pass --num_processes <GPUs> to accelerate launch (fine if the config is for another "
                          "machine)", "warning")


def deepspeed_installed(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    import importlib.util

    if cfg.kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        yield cfg.problem("distributed_type", "deepspeed is not installed here",
                          "pip install deepspeed on the training machine", "warning")


LAUNCH_RULES: list[LaunchRule] = [
    eight_bit_not_shardable, quant_storage_matches_dtype, zero3_qlora_init_flag, zero3_saves_adapter,
    deepspeed_values_match, fsdp_checkpointing, mixed_precision_agrees, processes_fit_gpus, deepspeed_installed,
]


def check_launch(recipe: Recipe, accelerate_config_path: str) -> list[Problem]:
    """Problems with the accelerate config itself, then with this recipe launched under it."""
    try:
        cfg = read_launch_config(accelerate_config_path)
    except UserError as err:
        return err.problems
    problems = list(nested_key_problems(cfg)) + list(value_problems(cfg))
    if any(p.is_error for p in problems):
        return problems
    return problems + [p for rule in LAUNCH_RULES for p in rule(recipe, cfg)]
