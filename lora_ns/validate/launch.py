"""``validate --accelerate-config``: the accelerate config, then recipe settings that clash with it.
accelerate's own loader reads the file, so what `accelerate launch` rejects is rejected here the same way.
Keys inside ``deepspeed_config`` / ``fsdp_config`` are checked against `accelerate launch`'s options:
accelerate copies them onto its arguments unchecked, so a misspelled one is silently ignored there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, suggest
from lora_ns.model import gradient_checkpointing
from lora_ns.yaml_reader import parse_yaml

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "accelerate_configs"
FSDP1_ONLY = ("fsdp_use_orig_params", "fsdp_sync_module_states", "fsdp_backward_prefetch",
              "fsdp_forward_prefetch", "fsdp_sharding_strategy")
# accelerate copies these sections' keys onto `accelerate launch` options: (prefix it adds, option families).
NESTED_SECTIONS = {"deepspeed_config": ("", ("zero", "offload_", "deepspeed_", "gradient_")),
                   "fsdp_config": ("fsdp_", ("fsdp_",))}


@dataclass(frozen=True)
class LaunchConfig:
    """accelerate's ClusterConfig as a dict (enums as their values), with the YAML line of each key."""

    path: str
    data: dict[str, Any]
    lines: dict[str, int]
    kind: str  # distributed_type: NO, MULTI_GPU, DEEPSPEED, FSDP, ...
    ds: dict[str, Any]  # deepspeed_config
    fsdp: dict[str, Any]  # fsdp_config
    mixed_precision: str | None

    def problem(self, key: str, message: str, fix: str = "", severity: str = "error") -> Problem:
        return Problem(self.path, key, message, fix, self.lines.get(key), severity)

    @property
    def zero3(self) -> bool:
        return self.kind == "DEEPSPEED" and str(self.ds.get("zero_stage", 2)) == "3"

    @property
    def processes(self) -> int:
        """num_processes: every machine's together (1 when unset, 0, or -1: given at launch)."""
        return max(int(self.data.get("num_processes") or 1), 1)

    @property
    def strategy(self) -> str | None:
        """The sharding lora_ns.memory estimates: zero3, fsdp2, zero2, ddp, or None for one process."""
        ddp = "ddp" if self.processes > 1 else None
        return {"DEEPSPEED": "zero3" if self.zero3 else "zero2", "FSDP": "fsdp2"}.get(self.kind, ddp)

    @property
    def fsdp_version(self) -> str:
        return str(self.fsdp.get("fsdp_version", 1))


def _flag(value: Any) -> bool:
    """accelerate keeps these as strings or bools ("true", True, "yes")."""
    return str(value).strip().lower() in ("true", "1", "yes")


COUNTS = {"num_processes": 0, "num_machines": 1, "machine_rank": 0}  # each key's least value (0 processes: 1)


def read_launch_config(name: str | Path) -> LaunchConfig:
    """Load an accelerate config (a path, or a shipped one by name: ``fsdp2``) with accelerate's own loader;
    any failure is a one-line `UserError`. We parse it too (JSON is YAML) for the key lines and the raw keys
    accelerate's errors are about."""
    from accelerate.commands.config.config_args import load_config_from_file

    path, shipped = Path(name), CONFIGS_DIR / f"{Path(name).stem}.yaml"
    use_shipped = not path.exists() and path.parent == Path(".") and shipped.is_file()
    source, start = str(shipped if use_shipped else path), "start from one in accelerate_configs/"
    try:
        raw, lines = parse_yaml(Path(source).read_text(encoding="utf-8"), source)
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
        raise UserError(Problem(source, "", "accelerate config not found",
                                f"pick one from accelerate_configs/ ({shipped})"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(source, "", f"cannot read accelerate config: {err}", "save it as UTF-8 text"))
    if not isinstance(raw, dict):
        raise UserError(Problem(source, "", "an accelerate config must be a mapping of keys", start))
    try:
        loaded = load_config_from_file(source)
    except ValueError as err:
        raise UserError(_loader_problems(source, raw, lines, str(err)))
    except (TypeError, KeyError, AttributeError) as err:
        raise UserError(Problem(source, "", f"accelerate cannot read it: {err}", start))
    data = {k: getattr(v, "value", v) for k, v in vars(loaded).items()}
    for key, least in COUNTS.items():  # accelerate reads them with int() as it launches: a traceback
        value = data.get(key)
        if value is None or key == "num_processes" and str(value) == "-1":  # -1: given at launch (SLURM)
            continue
        if not (str(value).isdigit() and int(value) >= least):
            raise UserError(Problem(source, key, f"{value!r} is not a whole number of at least {least}",
                                    f"set {key} (e.g. {least or 1})", lines.get(key)))
    precision = None if data.get("mixed_precision") is None else str(data["mixed_precision"]).lower()
    return LaunchConfig(source, data, lines, str(data.get("distributed_type", "NO")),
                        data.get("deepspeed_config") or {}, data.get("fsdp_config") or {}, precision)


def _loader_problems(source: str, raw: dict, lines: dict[str, int], message: str) -> list[Problem]:
    """accelerate's ValueError, as problems that name the key."""
    from accelerate.commands.config.config_args import ClusterConfig

    first, known = message.splitlines()[0], set(ClusterConfig.__dataclass_fields__)
    if "unknown keys" in message:
        extra = [k for k in raw if k not in known and k not in ("fp16", "dynamo_backend")]  # both converted
        why = "unknown key (accelerate refuses the file)"
        return [Problem(source, k, why, suggest(k, known, "valid keys", 12), lines.get(k))
                for k in extra] or [Problem(source, "", first)]
    if "distributed_type" in message or "DistributedType" in message:
        from accelerate.utils import DistributedType

        kinds = ", ".join(t.value for t in DistributedType)
        return [Problem(source, "distributed_type", first, f"use one of: {kinds}",
                        lines.get("distributed_type"))]
    return [Problem(source, "", first, "start from one in accelerate_configs/")]


# --- the config file on its own ---------------------------------------------------------------------

def config_problems(cfg: LaunchConfig) -> Iterator[Problem]:
    """Keys and values accelerate launch would silently ignore, or reject only once every node has started.
    Nested values get accelerate's own lists where it has them (its launch options have no choices there)."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.constants import FSDP2_STATE_DICT_TYPE, FSDP_AUTO_WRAP_POLICY, FSDP_STATE_DICT_TYPE

    options = {a.dest: a for a in launch_command_parser()._actions}  # `accelerate launch`'s, by name
    devices, two = ("none", "cpu", "nvme"), cfg.fsdp_version == "2"
    allowed = {"zero_stage": ("0", "1", "2", "3"), "offload_optimizer_device": devices,
               "offload_param_device": devices, "fsdp_auto_wrap_policy": FSDP_AUTO_WRAP_POLICY,
               "fsdp_state_dict_type": FSDP2_STATE_DICT_TYPE if two else FSDP_STATE_DICT_TYPE}
    precision = options["mixed_precision"].choices
    if cfg.mixed_precision is not None and cfg.mixed_precision not in precision:
        yield cfg.problem("mixed_precision", f"got {cfg.mixed_precision!r}",
                          suggest(str(cfg.mixed_precision), precision))
    for section, (prefix, families) in NESTED_SECTIONS.items():
        known = {name for name in options if name.startswith(families)}
        for key, value in (cfg.data.get(section) or {}).items():
            name, path = (key if key.startswith(prefix) else prefix + key), f"{section}.{key}"
            choices = options[name].choices or allowed.get(name) if name in known else None
            if name not in known:
                yield cfg.problem(path, "unknown key (accelerate launch would silently ignore it)",
                                  suggest(name, known, "valid keys", show=12))
            elif choices and str(value) not in choices:
                yield cfg.problem(path, f"got {value!r}", suggest(str(value), choices))
            elif name in FSDP1_ONLY and cfg.fsdp_version == "2":
                yield cfg.problem(path, "obsolete in FSDP2: accelerate drops it",
                                  "remove it (FSDP2 always uses the original parameters)", "warning")
    offload = str(cfg.ds.get("offload_param_device", "none")) != "none"
    if cfg.kind == "DEEPSPEED" and offload and not cfg.zero3:
        yield cfg.problem("deepspeed_config.offload_param_device", "parameter offload needs ZeRO stage 3",
                          "set zero_stage: 3, or offload_param_device: none")
    if cfg.kind == "FSDP" and cfg.fsdp_version == "1":
        yield cfg.problem("fsdp_config.fsdp_version", "FSDP1 is deprecated in accelerate 1.x",
                          "set fsdp_version: 2 (see accelerate_configs/fsdp2.yaml)", "warning")


# --- the recipe with the config -----------------------------------------------------------------------

def eight_bit_not_shardable(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    if r.quantization.load_in_8bit and cfg.kind in ("DEEPSPEED", "FSDP"):
        yield r.problem("quantization.load_in_8bit", f"8-bit bitsandbytes models cannot be trained with "
                        f"{cfg.kind} ({cfg.path})", "use load_in_4bit (QLoRA) with a matching "
                        "bnb_4bit_quant_storage, or accelerate_configs/multi_gpu.yaml (DDP)")


def quant_storage_matches_dtype(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """ZeRO-3/FSDP flatten all parameters into one buffer per dtype: packed 4-bit weights must be stored
    in the dtype of the rest of the model, or sharding fails (QLoRA + FSDP/ZeRO-3 recipe in the PEFT docs)."""
    if not (r.quantization.load_in_4bit and (cfg.zero3 or cfg.kind == "FSDP")):
        return
    # the dtype the weights train in: model.dtype, else the recipe's or the config's mixed precision
    flag = "bf16" if r.training.get("bf16") else "fp16" if r.training.get("fp16") else None
    dtype = r.model.dtype if r.model.dtype != "auto" else flag or \
        (cfg.mixed_precision if cfg.mixed_precision in ("bf16", "fp16") else None)
    storage, how = r.quantization.bnb_4bit_quant_storage, cfg.strategy
    if dtype is None:
        yield r.problem("model.dtype", f"4-bit + {how}: the training dtype must be fixed to match the quant "
                        "storage", "set model.dtype: bf16 and quantization.bnb_4bit_quant_storage: bf16")
    elif storage != dtype:
        yield r.problem("quantization.bnb_4bit_quant_storage", f"is {storage} but the model trains in "
                        f"{dtype}: {how} cannot shard 4-bit weights stored in another dtype ({cfg.path})",
                        f"set quantization.bnb_4bit_quant_storage: {dtype}")


def zero3_flags(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """QLoRA loads the 4-bit model straight into shards; the 16-bit gather saves the sharded adapter."""
    if cfg.zero3 and r.quantization.load_in_4bit and not _flag(cfg.ds.get("zero3_init_flag", False)):
        yield cfg.problem("deepspeed_config.zero3_init_flag", "QLoRA with ZeRO-3 needs zero3_init_flag: true "
                          "(the 4-bit model is loaded straight into shards)", "set zero3_init_flag: true "
                          "(see accelerate_configs/deepspeed_zero3_qlora.yaml)")
    if cfg.zero3 and not _flag(cfg.ds.get("zero3_save_16bit_model", False)):
        yield cfg.problem("deepspeed_config.zero3_save_16bit_model", "without it ZeRO-3 cannot gather the "
                          "sharded weights, so the saved adapter would be empty",
                          "set zero3_save_16bit_model: true")


def deepspeed_values_match(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """Values set in both places must agree, or the HF DeepSpeed integration stops at start-up."""
    pairs = (("gradient_accumulation_steps", "gradient_accumulation_steps", 1),
             ("gradient_clipping", "max_grad_norm", 1.0))
    for ds_key, recipe_key, default in pairs if cfg.kind == "DEEPSPEED" else ():
        value, wanted = cfg.ds.get(ds_key), r.training.get(recipe_key, default)
        if value not in (None, "auto") and float(value) != float(wanted):
            yield r.problem(f"training.{recipe_key}", f"is {wanted} but {cfg.path} sets {ds_key}: {value}",
                            f"make them agree, or remove {ds_key} from the accelerate config "
                            "(it then follows the recipe)")


def fsdp_checkpointing(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """Reentrant checkpointing re-runs forward inside backward, where FSDP's hooks do not expect it.
    transformers 5 defaults to use_reentrant: false, so only an explicit true is a problem."""
    if not (cfg.kind == "FSDP" and gradient_checkpointing(r)):  # the recipe's choice, or lora_ns's default
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


def mixed_precision_agrees(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """transformers takes the Trainer's bf16/fp16 flags over the launcher's mixed_precision without a word.
    lora_ns.train sets them from the recipe's flags, else from model.dtype; with dtype auto the machine
    decides, and fp32 weights leave mixed precision to the launcher: nothing to compare then."""
    t, dtype, theirs = r.training, r.model.dtype, cfg.mixed_precision
    flags = {name: t.get(name, None if dtype == "auto" else dtype == name) for name in ("fp16", "bf16")}
    ours = next((name for name, value in flags.items() if value), None)
    if theirs is None:
        return
    if not ours and ("bf16" in t or "fp16" in t) and None not in flags.values() and theirs != "no":
        field = "training.bf16" if "bf16" in t else "training.fp16"
        yield r.problem(field, f"the recipe turns mixed precision off but {cfg.path} says mixed_precision: "
                        f"{theirs}, which then applies", "set mixed_precision: no in the accelerate config, "
                        "or drop the flag from the recipe")
    elif ours and ours != theirs:
        field = f"training.{ours}" if ours in t else "model.dtype"
        yield r.problem(field, f"the recipe trains in {ours} but {cfg.path} says mixed_precision: "
                        f"{theirs} (the recipe would win silently)",
                        f"set mixed_precision: {ours} in the accelerate config, or change the recipe")


def visible_gpus(cfg: LaunchConfig) -> int:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = cfg.data.get("gpu_ids")
    if ids not in (None, "all") and count:
        count = min(count, len([i for i in str(ids).split(",") if i.strip()]))
    return count


def machine_fits(r: Recipe, cfg: LaunchConfig) -> Iterator[Problem]:
    """A warning only: the config may well be meant for another machine than the one validating it. (A missing
    deepspeed is `accelerate launch`'s own first check.)"""
    per_machine = cfg.processes // int(cfg.data.get("num_machines") or 1)  # both at least 1 (COUNTS)
    if not _flag(cfg.data.get("use_cpu", False)) and per_machine > (gpus := visible_gpus(cfg)):
        yield cfg.problem("num_processes", f"{per_machine} processes per machine but this machine sees "
                          f"{gpus} GPU{'s' if gpus != 1 else ''}",
                          "pass --num_processes <GPUs> to accelerate launch (fine if the config is for "
                          "another machine)", "warning")


LAUNCH_RULES = (eight_bit_not_shardable, quant_storage_matches_dtype, zero3_flags, deepspeed_values_match,
                fsdp_checkpointing, mixed_precision_agrees, machine_fits)


def launch_processes(path: str | None) -> int:
    """num_processes of an accelerate config; 1 without one, or when it cannot be read (`check_launch` says
    why)."""
    try:
        return read_launch_config(path).processes if path else 1
    except UserError:
        return 1


def check_launch(recipe: Recipe, accelerate_config_path: str) -> list[Problem]:
    """Problems with the accelerate config itself, then with this recipe launched under it."""
    try:
        cfg = read_launch_config(accelerate_config_path)
    except UserError as err:
        return err.problems
    problems = list(config_problems(cfg))
    if any(p.is_error for p in problems):
        return problems
    return problems + [p for rule in LAUNCH_RULES for p in rule(recipe, cfg)]
