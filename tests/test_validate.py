"""`python -m lora_ns.validate`: every shipped recipe passes; broken ones name the right field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns.errors import UserError, run_cli
from lora_ns.validate.__main__ import main as validate_main

from conftest import REPO

GOOD = {
    "task": "causal_lm",
    "model": {"name_or_path": "builtin:tiny-llama"},
    "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
    "training": {"max_steps": 3},
}

# (name, change applied to GOOD, field the message must name, words it must contain)
BROKEN = [
    ("qlora_without_4bit", {"peft": {"method": "qlora"}}, "peft.method", "load_in_4bit: true"),
    ("4bit_full_finetune", {"quantization": {"load_in_4bit": True}, "peft": {"method": "full"}},
     "peft.method", "cannot be fully fine-tuned"),
    ("4bit_and_8bit", {"quantization": {"load_in_4bit": True, "load_in_8bit": True}},
     "quantization.load_in_8bit", "choose one"),
    ("seq_cls_no_labels", {"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert"},
                           "dataset": {"path": "sample:gsm8k", "formatter": "glue_mrpc"}},
     "model.num_labels", "num_labels"),
    ("packing_on_seq_cls", {"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert", "num_labels": 2},
                            "dataset": {"path": "sample:gsm8k", "formatter": "glue_mrpc"},
                            "training": {"packing": True}},
     "training.packing", "only for causal_lm"),
    ("eval_without_val_split", {"training": {"eval_strategy": "steps"}}, "training.eval_strategy", "val_split"),
    ("streaming_without_max_steps", {"dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "streaming": True},
                                     "training": {}}, "training.max_steps", "max_steps"),
    ("unknown_formatter", {"dataset": {"path": "sample:gsm8k", "formatter": "gsm9k"}}, "dataset.formatter", "gsm8k"),
    ("formatter_wrong_task", {"task": "cpt"}, "dataset.formatter", "text"),
    ("misspelled_training_key", {"training": {"max_step": 3}}, "training.max_step", "did you mean 'max_steps'"),
    ("misspelled_section", {"peft_config": {"r": 8}}, "peft_config", "did you mean 'peft'"),
    ("bad_dtype", {"model": {"name_or_path": "builtin:tiny-llama", "dtype": "float8"}}, "model.dtype", "bf16"),
    ("bad_task", {"task": "chat"}, "task", "causal_lm"),
    ("missing_model_path", {"model": {"dtype": "fp32"}}, "model.name_or_path", "required"),
    ("negative_max_samples", {"dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 0}},
     "dataset.max_samples", "greater than or equal to 1"),
    ("val_fraction_too_big", {"dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "val_split": 1.5}},
     "dataset.val_split", "between 0 and 1"),
    ("unknown_builtin_model", {"model": {"name_or_path": "builtin:tiny-gpt9"}}, "model.name_or_path", "tiny-llama"),
    ("lr_not_a_number", {"training": {"learning_rate": "fast"}}, "training.learning_rate", "expected float"),
]


def _write(tmp_path: Path, name: str, change: dict) -> Path:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    data.update(change)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_shipped_recipe_validates(capsys):
    assert validate_main(["--all", str(REPO / "recipes"), "--no-data", "--no-model"]) == 0
    out = capsys.readouterr().out
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert len(shipped) >= 6
    for name in shipped:
        assert f"OK {REPO / 'recipes' / name}" in out


@pytest.mark.parametrize("name,change,field,words", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_recipe_names_the_field(tmp_path, capsys, name, change, field, words):
    path = _write(tmp_path, name, change)
    assert validate_main([str(path), "--no-data", "--no-model"]) == 2
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if f": {field}:" in ln or f": {field} " in ln), None)
    assert line is not None, err
    assert str(path) in line and words in line, line


def test_cli_exit_code_and_no_traceback(tmp_path):
    path = _write(tmp_path, "bad", {"training": {"max_step": 3}})
    run = subprocess.run([sys.executable, "-m", "lora_ns.validate", str(path), "--no-data", "--no-model"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0  # one problem, one line
    assert "training.max_step" in run.stderr


def test_missing_recipe_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"

    assert run_cli("lora_ns.validate", lambda: validate_main([str(missing)])) == 2
    assert f"{missing}: recipe file not found" in capsys.readouterr().err


def test_a_missing_recipe_names_the_closest_one_in_its_folder(tmp_path, capsys):
    """A typo, or the words of a name in another order, is answered with the recipe meant."""
    for name in ("gsm8k_grpo.yaml", "quickstart.yaml", "glue_mrpc.yaml"):
        (tmp_path / name).write_text("task: causal_lm\n")
    for given, hint in (("grpo_gsm8k.yaml", "did you mean 'DIR/gsm8k_grpo.yaml'?"),
                        ("quickstat.yaml", "did you mean 'DIR/quickstart.yaml'?"),
                        ("zzz.yaml", "recipes in DIR/: glue_mrpc.yaml, gsm8k_grpo.yaml, quickstart.yaml")):
        assert run_cli("lora_ns.validate", lambda: validate_main([str(tmp_path / given)])) == 2
        assert f"recipe file not found — {hint.replace('DIR', str(tmp_path))}" in capsys.readouterr().err


def test_overrides_fix_a_recipe_before_validation(tmp_path, capsys):
    path = _write(tmp_path, "qlora", {"peft": {"method": "qlora"}})
    assert validate_main([str(path), "--no-data", "--no-model", "quantization.load_in_4bit=true"]) == 0


def test_gpu_memory_prints_the_estimate_and_warns_when_it_does_not_fit(capsys):
    from lora_ns.validate.__main__ import main

    assert main([str(REPO / "recipes" / "quickstart.yaml"), "--no-data", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr()
    assert "per-GPU memory estimate" in out.out and "total" in out.out and "warning: memory" not in out.err
    assert main([str(REPO / "recipes" / "quickstart.yaml"), "--no-data", "--gpu-memory", "1MiB"]) == 0
    assert "warning: memory: needs ~" in capsys.readouterr().err  # a warning, not an error: exit 0
    # a size without a unit is bytes: '80' made every recipe "over 90%" of an 80-byte card
    assert run_cli("lora_ns.validate", lambda: main([str(REPO / "recipes" / "quickstart.yaml"), "--gpu-memory",
                                                     "80"])) == 2
    assert "--gpu-memory: '80' is 80 bytes: give a unit, e.g. 80GiB" in capsys.readouterr().err


def test_grpo_memory_report_counts_the_sampling_phase_without_progress_bars(capsys):
    """GRPO samples a generation batch at once (the recipe's 4 steps of 8): the report shows that phase's KV
    cache; reading the prompts for it printed a datasets "Map" bar in the middle of the report."""
    from lora_ns.validate.__main__ import main

    assert main([str(REPO / "recipes" / "gsm8k_grpo.yaml"), "--gpu-memory", "80GiB",
                 "model.name_or_path=builtin:tiny-llama", "dataset.path=sample:gsm8k", "dataset.name=null"]) == 0
    out = capsys.readouterr()
    assert "or sampling 32 rows (KV cache)" in out.out and "Map" not in out.err + out.out
    # a generation batch is shared by the processes the launch starts (--num-processes, as the config's)
    assert main([str(REPO / "recipes" / "gsm8k_grpo.yaml"), "--gpu-memory", "80GiB", "--num-processes", "2",
                 "model.name_or_path=builtin:tiny-llama", "dataset.path=sample:gsm8k", "dataset.name=null",
                 "training.steps_per_generation=null", "training.generation_batch_size=32"]) == 0
    assert "or sampling 16 rows (KV cache)" in capsys.readouterr().out


def test_pretrain_recipe_reports_parameters_and_token_budget(capsys):
    from lora_ns.validate.__main__ import main

    recipe = REPO / "recipes" / "pretrain_124m.yaml"
    assert main([str(recipe), "--no-data", "model.tokenizer_name_or_path=builtin:tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808 parameters" in out and "tokens per optimizer step" in out and "tokens in 5,000 steps" in out


def test_schema_and_rules_only_import_no_heavy_library(tmp_path):
    """validate --no-model --no-data reads the HF field names from the versioned cache after the first run."""
    # printed at exit: validate's __main__ ends the process itself (errors.exit_now runs the atexit handlers)
    code = ("import atexit, sys, runpy; sys.argv = ['v', 'recipes/gsm8k.yaml', '--no-model', '--no-data']\n"
            "atexit.register(lambda: print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft')\n"
            "                                     if m in sys.modules)))\n"
            "runpy.run_module('lora_ns.validate', run_name='__main__')\n")
    first = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    again = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and again.returncode == 0, again.stderr[-800:]
    assert again.stdout.strip().splitlines()[-1] == "[]"


def test_padding_share_follows_the_batching_training_will_use(capsys):
    import re

    def share(*overrides: str) -> int:
        assert validate_main([str(REPO / "recipes" / "quickstart.yaml"), "--no-model", *overrides]) == 0
        line = next(x for x in capsys.readouterr().err.splitlines() if "would be padding" in x)
        return int(re.search(r"(\d+)% of computed tokens", line).group(1))

    grouped = share()  # the default with sdpa: rows of similar length share a batch
    shuffled = share("training.train_sampling_strategy=random")
    assert grouped < shuffled  # the sample's rows differ in length, so grouping must pad less


def test_classifier_data_of_one_class_is_a_warning_and_the_classes_are_counted(tmp_path, capsys):
    """A label column mapped wrong (or a one-class file) trains a classifier that always gives one answer."""
    import json

    data, recipe = tmp_path / "pairs.jsonl", tmp_path / "cls.yaml"
    recipe.write_text(yaml.safe_dump({"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert",
                                                                   "labels": ["no", "yes"]},
                                      "dataset": {"path": str(data), "formatter": "glue_mrpc"}}))
    for labels, words in (([1] * 6, "label: all 6 rows have one class (yes: 6)"),
                          ([0, 1, 1, 0, 1, 1], "label: classes in 6 sampled rows: no: 2, yes: 4")):
        data.write_text("\n".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "label": label})
                                  for i, label in enumerate(labels)))
        assert validate_main([str(recipe), "--no-model"]) == 0
        (line,) = [x for x in capsys.readouterr().err.splitlines() if "label:" in x]
        assert words in line and (" warning: " in line) == (len(set(labels)) == 1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
def test_tf32_is_a_warning_when_validating_without_a_gpu_and_an_error_when_training(capsys, tmp_path):
    """As fp16: a recipe for a GPU run, checked on a laptop, warns (TrainingArguments refuses tf32 outright
    without an Ampere GPU, which stopped validate); training here stops before any weights load."""
    from lora_ns.train import main as train_main

    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    assert validate_main([quickstart, "--no-data", "training.tf32=true"]) == 0
    warning = (f"warning: {quickstart}: training.tf32: TF32 matmul (Ampere or newer) needs a CUDA GPU and none "
               "is visible")
    assert warning in capsys.readouterr().err
    out = tmp_path / "out"
    assert run_cli("lora_ns.train", lambda: train_main([quickstart, "training.tf32=true",
                                                         f"training.output_dir={out}"])) == 2
    assert warning.replace("warning", "error") in capsys.readouterr().err and not out.exists()


def test_a_ddp_backend_in_a_single_process_run_is_left_out_with_a_warning(capsys, tmp_path, monkeypatch):
    """accelerate asks torch for the world size of a process group no launcher started, and the Trainer's
    arguments failed to build ("Default process group has not been initialized"), validate's and train's."""
    from lora_ns.train import main as train_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    quickstart, out = str(REPO / "recipes" / "quickstart.yaml"), tmp_path / "out"
    warning = f"warning: {quickstart}: training.ddp_backend: ddp_backend 'gloo' applies under a launcher of several"
    assert validate_main([quickstart, "--no-data", "training.ddp_backend=gloo"]) == 0
    assert warning in capsys.readouterr().err
    assert train_main([quickstart, "training.ddp_backend=gloo", f"training.output_dir={out}", "training.max_steps=1",
                       "dataset.val_split=null", "training.eval_strategy=no", "training.eval_on_start=false"]) == 0
    assert warning in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()


def test_fsdp_in_a_single_process_run_is_left_out_with_a_warning(capsys, tmp_path, monkeypatch):
    """The Trainer refuses fsdp outside distributed training ("Using fsdp only works in distributed
    training") once the weights have loaded; validate passed. As ddp_backend: left out in a run of one."""
    from lora_ns.train import main as train_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    quickstart, out = str(REPO / "recipes" / "quickstart.yaml"), tmp_path / "out"
    warning = f"warning: {quickstart}: training.fsdp: fsdp 'full_shard' applies under a launcher of several"
    assert validate_main([quickstart, "--no-data", "training.fsdp=full_shard"]) == 0
    err = capsys.readouterr().err
    assert warning in err and "accelerate_configs/fsdp2.yaml" in err
    assert train_main([quickstart, "training.fsdp=full_shard", f"training.output_dir={out}", "training.max_steps=1",
                       "dataset.val_split=null", "training.eval_strategy=no", "training.eval_on_start=false"]) == 0
    assert warning in capsys.readouterr().err and (out / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_twice_is_refused_before_the_weights_load():
    """accelerator_config's gradient_accumulation_kwargs num_steps beside gradient_accumulation_steps: the
    Trainer refused the pair as it started."""
    from lora_ns.config import load_recipe
    from lora_ns.setup import Checks, setup

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "training.accelerator_config={gradient_accumulation_kwargs: {num_steps: 2}}",
        "training.gradient_accumulation_steps=4"])
    with pytest.raises(UserError, match="training.gradient_accumulation_steps: set beside accelerator_config"):
        setup(recipe, dry_run=True, checks=Checks(data=False))


def test_packing_without_a_max_length_is_refused_before_the_weights_load():
    from lora_ns.config import load_recipe
    from lora_ns.setup import Checks, setup

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["training.packing=true", "training.max_length=null"])
    with pytest.raises(UserError, match="training.max_length: null, and packing needs the row length"):
        setup(recipe, dry_run=True, checks=Checks(data=False))


def test_a_ddp_backend_validated_for_a_launch_of_several_processes_is_not_warned_about(capsys, monkeypatch):
    """Under --accelerate-config multi_gpu (8 processes) the backend is what that launch uses: the "run of one"
    warning was wrong there. It is still left out of this one process's arguments (they would not build)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    assert validate_main([quickstart, "--no-data", "--accelerate-config", "multi_gpu",
                          "training.ddp_backend=gloo"]) == 0
    err = capsys.readouterr().err
    assert "run of one" not in err and "warning: " + quickstart + ": training.ddp_backend" not in err
    assert "info: " + quickstart + ": training.ddp_backend: ddp_backend 'gloo' is for the 8 launched" in err


def test_a_deepspeed_config_without_deepspeed_warns_when_validating_and_stops_training(capsys, tmp_path,
                                                                                     monkeypatch):
    """As vLLM: validate on a machine without the package (TrainingArguments imported it and failed with a
    garbled package-metadata message) checks the rest; train there stops before loading, naming the extra."""
    import importlib.util

    from lora_ns.train import main as train_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    ds, out = tmp_path / "ds.json", tmp_path / "out"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}')
    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    assert validate_main([quickstart, "--no-data", f"training.deepspeed={ds}"]) == 0
    warning = f"warning: {quickstart}: training.deepspeed: deepspeed is not installed — pip install 'lora_ns[deepspeed]'"
    assert warning in capsys.readouterr().err
    assert run_cli("lora_ns.train", lambda: train_main([quickstart, f"training.deepspeed={ds}",
                                                         f"training.output_dir={out}"])) == 2
    assert warning.replace("warning", "error", 1) in capsys.readouterr().err and not out.exists()


def test_a_warmup_as_long_as_the_run_is_a_warning(capsys):
    """Shortening max_steps below warmup_steps: the learning rate climbs the whole run and never peaks."""
    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    for steps, warned in (("60", True), ("59", False), ("0.5", False)):  # below 1: a share of the run
        assert validate_main([quickstart, "--no-data", "training.max_steps=60", f"training.warmup_steps={steps}"]) == 0
        err = capsys.readouterr().err
        assert ("warning: recipes/quickstart.yaml: training.warmup_steps: warmup_steps 60 spans the whole run"
                in err.replace(str(REPO) + "/", "")) == warned, err


def test_a_prompt_template_ending_in_a_space_is_a_warning(capsys):
    """'A: ' + 'On Tuesday': the tokenizer joins the space to the answer (' On'), so TRL cuts the prompt short
    there (its warning names no recipe field) and inference asks with a space the model never saw."""
    quickstart = str(REPO / "recipes" / "quickstart.yaml")
    for template, warned in (("Q: {prompt} A: ", True), ("Q: {prompt} A:", False)):
        assert validate_main([quickstart, "--no-model", f"dataset.prompt_template={template}"]) == 0
        lines = [x for x in capsys.readouterr().err.splitlines() if "dataset.prompt_template" in x]
        assert bool(lines) == warned and all("ends with a space" in x and "newline" in x for x in lines)


def test_memory_estimate_without_a_reachable_model_config_is_a_warning(tmp_path, capsys):
    recipe = REPO / "recipes" / "template.yaml"  # names a hub model: unreachable offline
    assert validate_main([str(recipe), "--no-data", "--gpu-memory", "24GiB"]) == 0
    err = capsys.readouterr().err
    assert "memory estimate skipped" in err and "model.name_or_path" in err


def test_exit_now_keeps_the_output_the_atexit_handlers_and_the_code():
    """validate ends with `errors.exit_now` (no interpreter teardown, ~3 s): a piped, buffered stdout still
    arrives whole, atexit handlers still run, the exit code is kept."""
    script = ("import atexit; from lora_ns.errors import exit_now; "
              "atexit.register(lambda: print('atexit ran')); print('x' * 200_000); exit_now(3)")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3
    assert run.stdout == "x" * 200_000 + "\natexit ran\n"
