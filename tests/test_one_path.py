"""One path: validate runs train's own set-up (`lora_ns.setup`), so validate and train agree.

Each REJECTED recipe is one that used to pass validate and then crash train after the model loaded (or
"finish" 0 steps): validate must now refuse it with exit 2 and one line naming the file, the field and
a fix. Each ACCEPTED variant passes validate and then trains one step: nothing that validate lets
through fails in train's set-up.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns.config import load_recipe
from lora_ns.errors import run_cli
from lora_ns.validate.__main__ import main as validate_main

from conftest import REPO

GOOD = {
    "task": "causal_lm",
    "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
    "peft": {"method": "lora", "r": 4, "lora_alpha": 8},
    "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 16},
    "training": {"max_steps": 1, "per_device_train_batch_size": 2, "max_length": 128, "report_to": "none",
                 "logging_steps": 1},
}
SEQ_CLS = {"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert", "num_labels": 2},
           "dataset": {"path": "sample:glue_mrpc", "formatter": "glue_mrpc", "max_samples": 16},
           "training": {"max_length": None}}
EVAL_ON = {"dataset": {"val_split": 0.25}, "training": {"eval_strategy": "steps", "eval_steps": 1}}
BEST = {"load_best_model_at_end": True, "save_strategy": "steps", "save_steps": 1}

# (id, change merged into GOOD, field the one error line must name)
BATCH, ACCUM = "per_device_train_batch_size", "gradient_accumulation_steps"
REJECTED = [
    ("batch_size_0", {"training": {BATCH: 0}}, f"training.{BATCH}"),
    ("eval_batch_size_0", {"training": {"per_device_eval_batch_size": 0}}, "training.per_device_eval_batch_size"),
    ("grad_accum_0", {"training": {ACCUM: 0}}, f"training.{ACCUM}"),
    # these trained on, then stopped at the first evaluation, step or batch
    ("eval_accumulation_0", {"training": {"eval_accumulation_steps": 0}}, "training.eval_accumulation_steps"),
    ("neftune_negative", {"training": {"neftune_noise_alpha": -5.0}}, "training.neftune_noise_alpha"),
    ("dataset_num_proc_negative", {"training": {"dataset_num_proc": -1}}, "training.dataset_num_proc"),
    ("pad_to_multiple_of_a_word", {"task": "dpo", "dataset": {"path": "sample:preference", "formatter": "preference"},
                                   "training": {"pad_to_multiple_of": "eight"}}, "training.pad_to_multiple_of"),
    ("persistent_workers_without_workers", {"training": {"dataloader_persistent_workers": True}},
     "training.dataloader_persistent_workers"),
    ("compile_mode_unknown", {"training": {"torch_compile_mode": "max_autotune"}}, "training.torch_compile_mode"),
    ("adam_epsilon_0", {"training": {"adam_epsilon": 0.0}}, "training.adam_epsilon"),  # NaN at step 1
    ("chat_template_path_neither_file_nor_hub_id", {"training": {"chat_template_path": "chatml"}},
     "training.chat_template_path"),
    ("orpo_negative_padding_value", {"task": "orpo", "dataset": {"path": "sample:ultrafeedback",
                                                                 "formatter": "ultrafeedback"},
                                     "training": {"padding_value": -1}}, "training.padding_value"),
    ("negative_lr", {"training": {"learning_rate": -2e-4}}, "training.learning_rate"),
    # YAML's .inf/.nan: trained NaN weights (losses logged as 0) to a "finished" run
    ("lr_inf", {"training": {"learning_rate": float("inf")}}, "training.learning_rate"),
    ("weight_decay_nan", {"training": {"weight_decay": float("nan")}}, "training.weight_decay"),
    ("label_smoothing_2", {"training": {"label_smoothing_factor": 2}}, "training.label_smoothing_factor"),
    ("max_length_negative", {"training": {"max_length": -1}}, "training.max_length"),
    ("save_steps_0", {"training": {"save_steps": 0}}, "training.save_steps"),
    ("zero_epochs", {"training": {"max_steps": -1, "num_train_epochs": 0}}, "training.num_train_epochs"),
    ("bf16_and_fp16", {"training": {"bf16": True, "fp16": True}}, "training.fp16"),
    ("warmup_ratio_gone", {"training": {"warmup_ratio": 1.5}}, "training.warmup_ratio"),
    ("warmup_steps_negative", {"training": {"warmup_steps": -1}}, "training.warmup_steps"),
    ("logging_steps_0", {"training": {"logging_steps": 0}}, "training.logging_steps"),
    ("eval_steps_0", {**EVAL_ON, "training": {**EVAL_ON["training"], "eval_steps": 0}},
     "training.eval_steps"),
    ("unknown_scheduler", {"training": {"lr_scheduler_type": "cosine_x"}}, "training.lr_scheduler_type"),
    ("unknown_optim", {"training": {"optim": "adamw_fancy"}}, "training.optim"),
    ("lora_alpha_negative", {"peft": {"lora_alpha": -8}}, "peft.lora_alpha"),
    ("lora_alpha_0", {"peft": {"lora_alpha": 0}}, "peft.lora_alpha"),
    ("r_0", {"peft": {"r": 0}}, "peft.r"),
    ("dropout_1.5", {"peft": {"lora_dropout": 1.5}}, "peft.lora_dropout"),
    ("target_list_names_nothing", {"peft": {"target_modules": ["q_projection"]}}, "peft.target_modules"),
    ("target_regex_matches_nothing", {"peft": {"target_modules": "nothing_here.*"}}, "peft.target_modules"),
    # transformers names each class in the config: 10^12 of them exhausted memory in validate itself
    ("num_labels_absurd", {**SEQ_CLS, "model": {**SEQ_CLS["model"], "num_labels": 10 ** 12}}, "model.num_labels"),
    ("duplicate_labels", {**SEQ_CLS, "model": {**SEQ_CLS["model"], "labels": ["pos", "pos"]}},
     "model.labels"),
    ("scheduler_needs_kwargs", {"training": {"lr_scheduler_type": "cosine_with_min_lr"}},
     "training.lr_scheduler_kwargs"),
    ("padding_free_with_max_length", {"training": {"padding_free": True}}, "training.padding_free"),
    ("save_best_without_metric", {**EVAL_ON, "training": {**EVAL_ON["training"], "save_strategy": "best"}},
     "training.save_strategy"),
    ("compile_backend_unknown", {"training": {"torch_compile_backend": "inductr"}}, "training.torch_compile_backend"),
    ("optim_args_not_pairs", {"training": {"optim_args": "foo"}}, "training.optim_args"),
    ("loss_type_unknown", {"training": {"loss_type": "nlll"}}, "training.loss_type"),
    ("packing_strategy_unknown", {"training": {"packing": True, "packing_strategy": "bdf"}},
     "training.packing_strategy"),
    ("pad_to_multiple_of_0", {"training": {"pad_to_multiple_of": 0}}, "training.pad_to_multiple_of"),
    ("skip_prepare_dataset", {"training": {"dataset_kwargs": {"skip_prepare_dataset": True}}},
     "training.dataset_kwargs"),
    ("chat_template_file_missing", {"training": {"chat_template_path": "nowhere.jinja"}},
     "training.chat_template_path"),
    ("eos_token_not_in_tokenizer", {"training": {"eos_token": "<|end|>"}}, "training.eos_token"),
    ("pad_token_not_in_tokenizer", {"training": {"pad_token": "<pad>"}}, "training.pad_token"),
    ("init_needs_a_data_pass", {"peft": {"init_lora_weights": "corda"}}, "peft.init_lora_weights"),
    ("init_silently_plain_lora", {"peft": {"init_lora_weights": "eva"}}, "peft.init_lora_weights"),
    ("checkpointing_kwarg_unknown", {"training": {"gradient_checkpointing": True,
                                                  "gradient_checkpointing_kwargs": {"use_reentrnt": False}}},
     "training.gradient_checkpointing_kwargs"),
    ("selective_without_checkpointing", {"training": {"gradient_checkpointing_kwargs": {"selective": True}}},
     "training.gradient_checkpointing_kwargs"),
    ("best_model_metric_not_reported", {**EVAL_ON, "training": {**EVAL_ON["training"], **BEST,
                                                                "metric_for_best_model": "accuracy"}},
     "training.metric_for_best_model"),
    # transformers names load_best_model_at_end; the key to change is the other one
    ("best_model_save_steps_off_eval", {**EVAL_ON, "training": {**EVAL_ON["training"], **BEST, "eval_steps": 2,
                                                                "save_steps": 3}}, "training.save_steps"),
    ("best_model_save_strategy_off_eval", {**EVAL_ON, "training": {**EVAL_ON["training"], **BEST,
                                                                   "save_strategy": "epoch"}},
     "training.save_strategy"),
    ("adam_beta_out_of_range", {"training": {"adam_beta1": 1.5}}, "training.adam_beta1"),
    ("seed_negative", {"training": {"seed": -1}}, "training.seed"),
    ("lora_on_lm_head", {"peft": {"method": "lora", "r": 4, "lora_alpha": 8,
                                  "target_modules": ["q_proj", "lm_head"]}}, "peft.target_modules"),
    ("prefix_tuning_classifier", {**SEQ_CLS, "peft": {"method": "prefix_tuning", "num_virtual_tokens": 4}},
     "peft.method"),
    ("deepspeed_config_missing", {"training": {"deepspeed": "ds.json"}}, "training.deepspeed"),
]
if importlib.util.find_spec("lomo_optim") is None:
    REJECTED.append(("optim_package_missing", {"training": {"optim": "lomo"}}, "training.optim"))
if importlib.util.find_spec("liger_kernel") is None:
    REJECTED.append(("liger_missing", {"training": {"use_liger_kernel": True}}, "training.use_liger_kernel"))
if importlib.util.find_spec("wandb") is None:
    REJECTED.append(("report_to_missing_logger", {"training": {"report_to": "wandb"}}, "training.report_to"))

# (id, change merged into GOOD): all must validate and then train one step.
ACCEPTED = [
    ("lora", {}),
    ("ia3", {"peft": {"method": "ia3"}}),
    ("adalora", {"peft": {"method": "adalora", "init_r": 4, "target_r": 2, "lora_alpha": 8}}),
    ("prompt_tuning", {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4}}),
    ("full", {"peft": {"method": "full"}}),
    ("eval_on", EVAL_ON),
    ("packing", {"training": {"packing": True}}),
    ("padding_free_packed", {"training": {"packing": True, "padding_free": True}}),
    ("pissa_init", {"peft": {"init_lora_weights": "pissa"}}),
    ("prefix_tuning", {"peft": {"method": "prefix_tuning", "num_virtual_tokens": 4}}),
    ("best_model_by_token_accuracy", {**EVAL_ON, "training": {**EVAL_ON["training"], **BEST,
                                                              "metric_for_best_model": "mean_token_accuracy"}}),  # validate's meta model has no weights to SVD
    ("scheduler_with_kwargs", {"training": {"lr_scheduler_type": "cosine_with_min_lr",
                                            "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}}),
    ("seq_cls", {**SEQ_CLS, "peft": {"method": "lora", "r": 4, "lora_alpha": 8,
                                     "modules_to_save": ["classifier"]}}),
    ("cpt", {"task": "cpt", "dataset": {"path": "sample:text", "formatter": "text", "max_samples": None}}),
]


def merged(change: dict) -> dict:
    """GOOD with `change` merged in, section by section; a None value removes the key, and a peft
    section naming its method replaces GOOD's."""
    data = copy.deepcopy(GOOD)
    for key, value in change.items():
        if isinstance(value, dict) and not (key == "peft" and "method" in value):
            value = {k: v for k, v in {**data.get(key, {}), **value}.items() if v is not None}
        data[key] = value
    return data


def write(tmp_path: Path, name: str, change: dict) -> Path:
    data = merged(change)
    data["training"]["output_dir"] = str(tmp_path / "out")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name,change,field", REJECTED, ids=[c[0] for c in REJECTED])
def test_validate_rejects_what_train_would_fail_on(name, change, field, tmp_path, capsys, tiny_llama,
                                                  tiny_bert):
    path = write(tmp_path, name, change)
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path), "--no-data"])) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines  # one problem, one line, no traceback
    head, _, fix = lines[0].partition(" — ")
    assert head.startswith(f"lora_ns.validate: error: {path}:") and f" {field}: " in head, lines[0]
    assert fix.strip(), lines[0]  # says how to fix it
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_library_error_keeps_the_list_its_first_line_introduces(tmp_path, capsys, tiny_llama):
    """transformers says "... but found" and lists the two strategies on the next lines: the one-line
    message must carry them, or it ends in mid-sentence."""
    training = {**EVAL_ON["training"], **BEST, "save_strategy": "epoch"}
    path = write(tmp_path, "best", {**EVAL_ON, "training": training})
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path), "--no-data"])) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert "but found Evaluation strategy: " in line and ", Save strategy: " in line and "EPOCH" in line, line


def test_fp16_beside_a_bf16_model_says_where_bf16_came_from(tmp_path, capsys, tiny_llama):
    """lora_ns turns on the mixed precision model.dtype names: transformers' refusal speaks of a bf16 the user
    never wrote, so the fix says it came from model.dtype."""
    path = write(tmp_path, "mixed", {"model": {"dtype": "bf16"}, "training": {"fp16": True}})
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path), "--no-data"])) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert " training.fp16: " in line and "lora_ns sets the one model.dtype names" in line, line


def test_a_hold_out_that_leaves_no_training_rows_is_refused(tmp_path, capsys, tiny_llama):
    """16 rows, 0.99 held out: datasets' split leaves training empty. The data check knows the row count
    (max_samples caps it) and splits as training does."""
    path = write(tmp_path, "hold_out", {"dataset": {"val_split": 0.99}, "training": EVAL_ON["training"]})
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path)])) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert f"{path}:" in line and " dataset.val_split: cannot hold out 0.99 of 16 rows" in line, line
    write(tmp_path, "hold_out", {"dataset": {"val_split": 0.25}, "training": EVAL_ON["training"]})
    assert validate_main([str(path)]) == 0, capsys.readouterr().err


def test_rows_that_fill_no_batch_with_drop_last_are_refused(tmp_path, capsys, tiny_llama):
    """16 rows, 4 held out, batches of 16 with dataloader_drop_last: training ran no step (train stopped only
    after the weights loaded). The data check knows the row count and says it; batches of 12 fill one."""
    training = {**EVAL_ON["training"], "per_device_train_batch_size": 16, "dataloader_drop_last": True}
    path = write(tmp_path, "drop", {"dataset": {"val_split": 0.25}, "training": training})
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path)])) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert " training.per_device_train_batch_size: 12 training rows fill no batch of 16" in line, line
    write(tmp_path, "drop", {"dataset": {"val_split": 0.25}, "training": {**training,
                                                                         "per_device_train_batch_size": 12}})
    assert validate_main([str(path)]) == 0, capsys.readouterr().err


def test_a_max_length_that_cuts_every_answer_away_is_refused(tmp_path, capsys, tiny_llama):
    """TRL truncates rows to max_length, then drops those left with no loss token: at 16 tokens every GSM8K
    row loses its answer and training started with no data (an IndexError in the sampler). Some rows lost:
    a warning, since they silently go untrained."""
    path = write(tmp_path, "short", {"training": {"max_length": 16}})
    assert run_cli("lora_ns.validate", lambda: validate_main([str(path)])) == 2
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert " training.max_length: 16 of 16 sampled rows keep no loss token within max_length=16" in line, line
    write(tmp_path, "short", {"training": {"max_length": 40}})
    assert validate_main([str(path)]) == 0
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ": warning: " in ln]
    lost = int(line.split("training.max_length: ")[1].split()[0])
    assert 0 < lost < 16 and "of 16 sampled rows keep no loss token within max_length=40" in line, line


@pytest.mark.parametrize("name,change", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_what_validate_accepts_trains(name, change, tmp_path, capsys, tiny_llama, tiny_bert):
    from lora_ns.train import train

    path = write(tmp_path, name, change)
    assert validate_main([str(path)]) == 0, capsys.readouterr().err
    assert "error" not in capsys.readouterr().err
    summary = train(load_recipe(path))
    assert summary["steps"] == 1
    out = tmp_path / "out"
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 1
    saved = load_recipe(out / "recipe.yaml")
    assert saved.peft.options == load_recipe(path).peft.options  # what was given, not what peft appended


def test_train_does_not_import_the_validate_command():
    """validate imports train's set-up, never the other way round."""
    code = "import sys, lora_ns.train; assert 'lora_ns.validate.__main__' not in sys.modules, 'imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
