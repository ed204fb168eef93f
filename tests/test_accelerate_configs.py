"""accelerate_configs/: every file is read by accelerate's own loader and turned into the plugin
`accelerate launch` would build from it; `lora_ns.validate.launch` catches the known-bad recipe x config
combinations, and the configs' own mistakes, with the field to fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lora_ns.validate import launch as launch_checks
from lora_ns.config import parse_recipe
from lora_ns.validate.launch import check_launch, read_launch_config

from conftest import REPO

CONFIGS = REPO / "accelerate_configs"
REQUIRED = {"single_gpu", "multi_gpu", "multi_node", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3",
            "deepspeed_zero3_offload", "deepspeed_zero3_qlora", "fsdp2", "fsdp2_qlora"}
ALL = sorted(CONFIGS.glob("*.yaml"))
BASE = {"task": "causal_lm", "model": {"name_or_path": "builtin:tiny-llama"},
        "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"}}
QLORA = {**BASE, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "bf16"},
         "quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage": "bf16"}, "peft": {"method": "qlora"}}


def recipe(base: dict = BASE, **sections) -> object:
    data = {**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}}
    return parse_recipe(data, "r.yaml")


def config(tmp_path: Path, name: str = "", **changes) -> str:
    """A shipped config by name, optionally changed (nested dicts merged), written to tmp_path."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) if name else {"distributed_type": "MULTI_GPU"}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name or 'custom'}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def errors(problems) -> list[str]:
    return [p.field for p in problems if p.is_error]


def warnings(problems) -> list[str]:
    return [p.field for p in problems if p.severity == "warning"]


@pytest.fixture
def eight_gpus(monkeypatch):
    """Pretend 8 GPUs are visible, so the machine running the tests does not matter."""
    monkeypatch.setattr(launch_checks, "visible_gpus", lambda cfg: 8)


@pytest.fixture
def clean_env():
    """Building plugins reads (and FSDP's writes) os.environ; DeepSpeed's sets a transformers global."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()


# --- the shipped files ----------------------------------------------------------------------------

def test_every_required_config_is_shipped():
    assert REQUIRED <= {p.stem for p in ALL}
    assert (CONFIGS / "README.md").is_file()
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    assert all(f"{p.stem}.yaml" in readme for p in ALL), "README.md should list every config"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_accelerate_loads_it_and_launch_checks_pass(path, eight_gpus):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    loaded = load_config_from_file(str(path))
    assert isinstance(loaded, ClusterConfig)
    cfg = read_launch_config(path)
    assert list(launch_checks.config_problems(cfg)) == []
    fitting = QLORA if "qlora" in path.stem else BASE  # the QLoRA configs are for 4-bit recipes
    assert errors(check_launch(parse_recipe(fitting, "r.yaml"), str(path))) == []


def launched(path: Path, *cli: str):
    """What `accelerate launch --config_file path` would do: its own argument handling, then the launcher's env."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), *cli, "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    return args, {}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.stem)
def test_the_plugin_accelerate_would_build(path, clean_env):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    # as the second node would run it (the first checks that main_process_port is free on this machine)
    args, env = launched(path, *(["--machine_rank", "1"] if path.stem == "multi_node" else []))
    os.environ.update({k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))})
    name = path.stem
    if name.startswith("deepspeed"):
        plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == (3 if "zero3" in name else 2)
        assert zero["offload_optimizer"]["device"] == ("cpu" if name.endswith("offload") else "none")
        assert zero["offload_param"]["device"] == ("cpu" if name == "deepspeed_zero3_offload" else "none")
        assert plugin.zero3_init_flag is ("qlora" in name)
        if plugin.zero_stage == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # follows the recipe
    elif name.startswith("fsdp"):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert plugin.cpu_ram_efficient_loading is True
        assert plugin.auto_wrap_policy is not None
        assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
        assert plugin.use_orig_params is None and plugin.sync_module_states is None  # FSDP1-only
    elif name.startswith("multi"):
        assert args.multi_gpu and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        if name == "multi_node":  # torchrun's arguments on node 1 of 2
            assert (args.nnodes, args.node_rank, int(args.nproc_per_node)) == ("2", 1, args.num_processes // 2)
            rendezvous = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
            assert rendezvous == f"{args.main_process_ip}:{args.main_process_port}"
    else:
        assert not (args.multi_gpu or args.use_deepspeed or args.use_fsdp) and args.num_processes == 1


# --- reading a config -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, field, words", [
    ("distributed_type: MULTI_GPU\nnum_process: 2\n", "num_process", "did you mean 'num_processes'"),
    ("distributed_type: MULTI_GPUS\n", "distributed_type", "not a valid"),
    ("num_processes: 2\n", "distributed_type", "must be specified"),
    ("distributed_type: MULTI_GPU\n  num_processes: 2\n: x\n", "", "invalid YAML"),
    ("- distributed_type: MULTI_GPU\n", "", "must be a mapping"),
    ("", "", "must be a mapping"),
    # validate's process count and accelerate's launch read them with int(): a ValueError traceback
    ("distributed_type: MULTI_GPU\nnum_processes: eight\n", "num_processes", "'eight' is not a whole number"),
    ("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_machines: -2\n", "num_machines", "at least 1"),
])
def test_unreadable_configs_are_one_problem_each(tmp_path, text, field, words):
    path = tmp_path / "acc.yaml"
    path.write_text(text, encoding="utf-8")
    problems = check_launch(recipe(), str(path))
    assert [p.field for p in problems] == [field] and words in problems[0].message + problems[0].fix
    assert problems[0].file == str(path)


def test_processes_left_to_the_launch_are_not_refused(tmp_path):
    """num_processes: -1 is accelerate's own default, for a count given at launch (SLURM): one process to
    validate's checks, where it had counted -1."""
    path = tmp_path / "acc.yaml"
    path.write_text("distributed_type: MULTI_GPU\nnum_processes: -1\n", encoding="utf-8")
    assert read_launch_config(path).processes == 1
    assert not [p for p in check_launch(recipe(), str(path)) if p.is_error]


def test_missing_json_and_named_configs(tmp_path, eight_gpus, monkeypatch):
    (problem,) = check_launch(recipe(), str(tmp_path / "nope.yaml"))
    assert problem.file.endswith("nope.yaml") and "not found" in problem.message and "fsdp2" in problem.fix
    monkeypatch.chdir(tmp_path)
    assert read_launch_config("fsdp2").path == str(CONFIGS / "fsdp2.yaml")  # a shipped config by name
    path = tmp_path / "acc.json"
    path.write_text('{"distributed_type": "MULTI_GPU", "num_processes": 2, "mixed_precision": "bf16"}')
    assert check_launch(recipe(), str(path)) == []


@pytest.mark.parametrize("name, changes, field, severity", [
    ("fsdp2", {"fsdp_config": {"fsdp_auto_wrap_polcy": "NO_WRAP"}}, "fsdp_config.fsdp_auto_wrap_polcy", "error"),
    ("fsdp2", {"fsdp_config": {"auto_wrap_policy": "SIZE_BASED_WRAP"}}, None, None),  # accelerate adds "fsdp_"
    ("fsdp2", {"fsdp_config": {"fsdp_auto_wrap_policy": "LAYER_WRAP"}}, "fsdp_config.fsdp_auto_wrap_policy", "error"),
    ("fsdp2", {"fsdp_config": {"fsdp_state_dict_type": "LOCAL_STATE_DICT"}}, "fsdp_config.fsdp_state_dict_type",
     "error"),
    ("fsdp2", {"fsdp_config": {"fsdp_version": 3}}, "fsdp_config.fsdp_version", "error"),
    ("fsdp2", {"fsdp_config": {"fsdp_use_orig_params": True}}, "fsdp_config.fsdp_use_orig_params", "warning"),
    ("fsdp2", {"fsdp_config": {"fsdp_version": 1}}, "fsdp_config.fsdp_version", "warning"),
    ("deepspeed_zero2", {"deepspeed_config": {"zero_stage": 4}}, "deepspeed_config.zero_stage", "error"),
    ("deepspeed_zero2", {"deepspeed_config": {"zero_stag": 3}}, "deepspeed_config.zero_stag", "error"),
    ("deepspeed_zero2", {"deepspeed_config": {"offload_optimizer_device": "gpu"}},
     "deepspeed_config.offload_optimizer_device", "error"),
    ("deepspeed_zero2", {"deepspeed_config": {"offload_param_device": "cpu"}}, "deepspeed_config.offload_param_device",
     "error"),
    ("multi_gpu", {"mixed_precision": "fp32"}, "mixed_precision", "error"),
])
def test_config_mistakes(tmp_path, eight_gpus, name, changes, field, severity):
    problems = check_launch(recipe(), config(tmp_path, name, **changes))
    assert [(p.field, p.severity) for p in problems] == ([(field, severity)] if field else [])


# --- the recipe with the config ------------------------------------------------------------------------

EIGHT_BIT = {"quantization": {"load_in_8bit": True}}
FOUR_BIT_UINT8 = {**QLORA, "quantization": {"load_in_4bit": True}}


@pytest.mark.parametrize("name, recipe_data, changes, field", [
    # 8-bit cannot be sharded; DDP is fine
    ("deepspeed_zero2", {**BASE, **EIGHT_BIT}, {}, "quantization.load_in_8bit"),
    ("fsdp2", {**BASE, **EIGHT_BIT}, {}, "quantization.load_in_8bit"),
    ("multi_gpu", {**BASE, **EIGHT_BIT}, {}, None),
    # 4-bit + sharding needs the quant storage = training dtype; DDP and ZeRO-2 do not shard weights
    ("fsdp2_qlora", FOUR_BIT_UINT8, {}, "quantization.bnb_4bit_quant_storage"),
    ("deepspeed_zero3_qlora", FOUR_BIT_UINT8, {}, "quantization.bnb_4bit_quant_storage"),
    ("fsdp2_qlora", {**QLORA, "model": {"name_or_path": "builtin:tiny-llama"}}, {"mixed_precision": "no"},
     "model.dtype"),
    ("multi_gpu", FOUR_BIT_UINT8, {}, None),
    ("deepspeed_zero2", FOUR_BIT_UINT8, {}, None),
    ("fsdp2_qlora", QLORA, {}, None),
    # ZeRO-3 + QLoRA needs zero3_init_flag; ZeRO-3 needs the 16-bit gather to save the adapter
    ("deepspeed_zero3", QLORA, {}, "deepspeed_config.zero3_init_flag"),
    ("deepspeed_zero3_qlora", QLORA, {}, None),
    ("deepspeed_zero3", BASE, {"deepspeed_config": {"zero3_save_16bit_model": False}},
     "deepspeed_config.zero3_save_16bit_model"),
    # values set in both places must agree under DeepSpeed
    ("deepspeed_zero2", {**BASE, "training": {"gradient_accumulation_steps": 4}},
     {"deepspeed_config": {"gradient_accumulation_steps": 1}}, "training.gradient_accumulation_steps"),
    ("deepspeed_zero2", {**BASE, "training": {"gradient_accumulation_steps": 4}},
     {"deepspeed_config": {"gradient_accumulation_steps": "auto"}}, None),
    ("deepspeed_zero2", BASE, {"deepspeed_config": {"gradient_clipping": 0.3}}, "training.max_grad_norm"),
    # FSDP + gradient checkpointing: reentrant breaks FSDP (transformers 5 defaults to non-reentrant)
    ("fsdp2", {**BASE, "training": {"gradient_checkpointing": True,
                                    "gradient_checkpointing_kwargs": {"use_reentrant": True}}}, {},
     "training.gradient_checkpointing_kwargs"),
    ("fsdp2_qlora", {**QLORA, "training": {"activation_checkpointing_kwargs": {"use_reentrant": True}}}, {},
     "training.activation_checkpointing_kwargs"),  # on by default for a quantized model
    ("fsdp2", {**BASE, "training": {"activation_checkpointing_kwargs": {"use_reentrant": True}}}, {}, None),  # off
    ("fsdp2", {**BASE, "training": {"gradient_checkpointing": True}}, {}, None),
    ("fsdp2", {**BASE, "training": {"gradient_checkpointing": True}},
     {"fsdp_config": {"fsdp_activation_checkpointing": True}}, "training.gradient_checkpointing"),
    ("multi_gpu", {**BASE, "training": {"gradient_checkpointing": True,
                                        "gradient_checkpointing_kwargs": {"use_reentrant": True}}}, {}, None),
    # mixed precision: the Trainer's flags win over the launcher's without a word
    ("multi_gpu", {**BASE, "training": {"fp16": True}}, {}, "training.fp16"),
    ("multi_gpu", {**BASE, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp16"}}, {}, "model.dtype"),
    ("multi_gpu", {**BASE, "training": {"bf16": False, "fp16": False}}, {}, "training.bf16"),
    ("multi_gpu", {**BASE, "training": {"bf16": True}}, {}, None),
    ("multi_gpu", {**BASE, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"}}, {}, None),  # AMP
    ("multi_gpu", {**BASE, "training": {"fp16": True}}, {"mixed_precision": "fp16"}, None),
])
def test_recipe_and_config_combinations(tmp_path, eight_gpus, name, recipe_data, changes, field):
    path = config(tmp_path, name, **changes)
    problems = check_launch(parse_recipe(recipe_data, "r.yaml"), path)
    assert errors(problems) == ([field] if field else [])
    for p in problems:  # each names the file to fix: the recipe for recipe fields, else the accelerate config
        assert p.file == ("r.yaml" if p.field.split(".")[0] in ("training", "model", "quantization") else path)


def test_more_processes_than_gpus_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_checks, "visible_gpus", lambda cfg: 2)
    problems = check_launch(recipe(), str(CONFIGS / "multi_gpu.yaml"))
    assert errors(problems) == [] and warnings(problems) == ["num_processes"]
    assert check_launch(recipe(), config(tmp_path, "multi_gpu", num_processes=2)) == []
    node = check_launch(recipe(), str(CONFIGS / "multi_node.yaml"))  # 16 processes on 2 machines: 8 each
    assert warnings(node) == ["num_processes"] and "8 processes per machine" in node[0].message
