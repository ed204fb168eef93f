"""Cross-field rules (lora_ns.validate.rules): each fires on its own mistake, names the field and says how to fix it,
and stays quiet on a good recipe and on every shipped recipe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_ns.validate import rules
from lora_ns.config import load_recipe, parse_recipe

from conftest import REPO

GOOD = {"task": "causal_lm", "model": {"name_or_path": "builtin:tiny-llama"},
        "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"}, "training": {"max_steps": 3}}
BERT = {"name_or_path": "builtin:tiny-bert", "num_labels": 2}
PAIRS = {"path": "sample:glue_mrpc", "formatter": "glue_mrpc"}


def make(change: dict) -> object:
    data = {**GOOD, **{k: ({**GOOD[k], **v} if isinstance(v, dict) and k in GOOD else v) for k, v in change.items()}}
    return parse_recipe(data, "r.yaml")


# (rule, change to GOOD, field named, severity)
CASES = [
    (rules.quantization_fits_method, {"peft": {"method": "qlora"}}, "peft.method", "error"),
    (rules.quantization_fits_method, {"quantization": {"load_in_4bit": True, "load_in_8bit": True}},
     "quantization.load_in_8bit", "error"),
    (rules.quantization_fits_method, {"quantization": {"load_in_4bit": True}, "peft": {"method": "full"}},
     "peft.method", "error"),
    (rules.checkpointing_fits_method, {"peft": {"method": "prefix_tuning", "num_virtual_tokens": 8},
                                       "training": {"gradient_checkpointing": True}},
     "training.gradient_checkpointing", "error"),  # the first backward stopped on a size mismatch
    # TRL's trainers stopped on these once the weights had loaded (AdaLoRA: the reference copy of the adapter)
    (rules.method_fits_trainer, {"task": "dpo", "peft": {"method": "adalora", "total_step": 10},
                                 "dataset": {"formatter": "preference"}}, "peft.method", "error"),
    (rules.method_fits_trainer, {"task": "orpo", "peft": {"method": "prompt_tuning"},
                                 "dataset": {"formatter": "preference"}}, "peft.method", "error"),
    (rules.classifier_fields, {"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert"},
                               "dataset": PAIRS}, "model.num_labels", "error"),
    (rules.classifier_fields, {"task": "seq_cls", "model": {**BERT, "labels": ["a", "b", "c"]}, "dataset": PAIRS},
     "model.labels", "error"),
    (rules.data_splits, {"training": {"eval_strategy": "steps"}}, "training.eval_strategy", "error"),
    (rules.data_splits, {"training": {"eval_on_start": True}}, "training.eval_on_start", "error"),
    (rules.data_splits, {"dataset": {"val_split": "sample:gsm8k"}}, "dataset.val_split", "warning"),
    (rules.data_splits, {"dataset": {"path": "org/data", "val_split": "train"}}, "dataset.val_split", "warning"),
    (rules.data_splits, {"dataset": {"streaming": True}, "training": {"max_steps": -1}},
     "training.max_steps", "error"),
    (rules.data_splits, {"dataset": {"val_split": 1.5}}, "dataset.val_split", "error"),
    (rules.data_splits, {"dataset": {"revision": "v1"}}, "dataset.revision", "warning"),  # sample: local
    (rules.classifier_fields, {"model": {"name_or_path": "builtin:tiny-llama", "num_labels": 3}}, "model.num_labels",
     "warning"),  # causal_lm: ignored
    # these trained as if not written (found by bench/sweep_sections.py)
    (rules.classifier_fields, {"dataset": {"pairs": True}}, "dataset.pairs", "warning"),  # causal_lm: ignored
    (rules.classifier_fields, {"task": "seq_cls", "model": BERT, "dataset": {**PAIRS, "system_prompt": "Be brief."}},
     "dataset.system_prompt", "warning"),
    (rules.local_model_paths_exist, {"model": {"name_or_path": "builtin:tiny-llama", "revision": "v2"}},
     "model.revision", "warning"),
    (rules.names_resolve, {"dataset": {"formatter": "gsm9k"}}, "dataset.formatter", "error"),
    (rules.names_resolve, {"task": "cpt"}, "dataset.formatter", "error"),
    (rules.names_resolve, {"model": {"name_or_path": "builtin:tiny-gpt9"}}, "model.name_or_path", "error"),
    (rules.names_resolve, {"peft": {"method": "lora", "target_modules": "all_linear"}}, "peft.target_modules",
     "error"),
    (rules.names_resolve, {"model": {"trust_remote_code": True}}, "model.trust_remote_code", "warning"),
    (rules.no_secrets_in_recipe, {"training": {"hub_token": "hf_anything"}}, "training.hub_token", "error"),
    (rules.no_secrets_in_recipe, {"peft": {"method": "prompt_tuning",
                                           "tokenizer_name_or_path": "hf_" + "Ab1" * 12}},
     "peft.tokenizer_name_or_path", "error"),
    (rules.resume_checkpoint_exists, {"training": {"resume_from_checkpoint": "nowhere/checkpoint-9"}},
     "training.resume_from_checkpoint", "error"),
    (rules.local_model_paths_exist, {"model": {"name_or_path": "./models/nowhere"}}, "model.name_or_path", "error"),
    (rules.no_shell_variables, {"training": {"output_dir": "$SCRATCH/runs/a"}}, "training.output_dir", "error"),
    # YAML's .inf/.nan: NaN weights and a "finished" run (lr, weight decay), or nothing learned (adam_epsilon)
    (rules.finite_numbers, {"training": {"learning_rate": float("inf")}}, "training.learning_rate", "error"),
    (rules.finite_numbers, {"training": {"weight_decay": float("nan")}}, "training.weight_decay", "error"),
    (rules.finite_numbers, {"peft": {"lora_alpha": 16, "lora_dropout": float("nan")}}, "peft.lora_dropout",
     "error"),
    (rules.no_shell_variables, {"model": {"chat_template": "${TEMPLATES}/chatml.jinja"}}, "model.chat_template",
     "error"),
    (rules.local_model_paths_exist, {"model": {"tokenizer_name_or_path": "/nowhere/tokenizer"}},
     "model.tokenizer_name_or_path", "error"),
    (rules.classifier_fields, {"task": "seq_cls", "model": {**BERT, "labels": ["pos", "pos"]},
                               "dataset": PAIRS}, "model.labels", "error"),
    (rules.values_in_range, {"training": {"per_device_train_batch_size": 0}},
     "training.per_device_train_batch_size", "error"),
    (rules.values_in_range, {"training": {"gradient_accumulation_steps": 0}},
     "training.gradient_accumulation_steps", "error"),
    (rules.values_in_range, {"training": {"learning_rate": -1e-4}}, "training.learning_rate",
     "error"),
    (rules.values_in_range, {"training": {"learning_rate": 0}}, "training.learning_rate", "warning"),  # control
    (rules.values_in_range, {"training": {"label_smoothing_factor": 1.0}}, "training.label_smoothing_factor",
     "error"),
    (rules.values_in_range, {"training": {"max_length": 0}}, "training.max_length", "error"),
    (rules.values_in_range, {"training": {"save_steps": 0}}, "training.save_steps", "error"),
    (rules.values_in_range, {"training": {"eval_strategy": "steps", "eval_steps": 0}},
     "training.eval_steps", "error"),
    (rules.peft_values, {"peft": {"method": "lora", "lora_alpha": -8}}, "peft.lora_alpha", "error"),
    # peft built these, then stopped at the adapter's build (validate's traceback) or the first step
    (rules.peft_values, {"peft": {"method": "prefix_tuning", "num_virtual_tokens": -1}}, "peft.num_virtual_tokens",
     "error"),
    (rules.peft_values, {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 8, "token_dim": 0}},
     "peft.token_dim", "error"),
    (rules.peft_values, {"peft": {"method": "adalora", "total_step": 10, "deltaT": 0}}, "peft.deltaT", "error"),
    (rules.peft_values, {"peft": {"method": "adalora", "total_step": 10, "init_r": 0}}, "peft.init_r", "error"),
    (rules.peft_values, {"peft": {"method": "adalora", "total_step": 10, "beta1": 1.0}}, "peft.beta1", "error"),
    # these trained, doing nothing (or the opposite) of what they say
    (rules.peft_values, {"peft": {"method": "adalora", "total_step": 10, "tinit": -1}}, "peft.tinit", "error"),
    (rules.peft_values, {"peft": {"method": "lora", "layers_to_transform": [0]}}, "peft.layers_to_transform",
     "error"),  # peft refused it beside the default 'all-linear' with a fix naming layers_to_transform only
    (rules.peft_values, {"peft": {"method": "lora", "lora_dropout": -0.1}}, "peft.lora_dropout", "error"),
    (rules.peft_values, {"peft": {"method": "lora", "lora_dropout": 1.0}}, "peft.lora_dropout", "error"),
    (rules.values_in_range, {"training": {"weight_decay": -0.01}}, "training.weight_decay", "error"),
    (rules.checkpoints_are_saved, {"training": {"save_total_limit": 2, "save_strategy": "no"}},
     "training.save_total_limit", "warning"),
    (rules.checkpoints_are_saved, {"training": {"save_steps": 5, "save_strategy": "no"}}, "training.save_steps",
     "warning"),
    (rules.check_pretrain, {"model": {"config": "tiny"}}, "model.config", "error"),  # more: test_pretrain
]


@pytest.mark.parametrize("rule, change, field, severity", CASES,
                         ids=[f"{c[0].__name__}-{c[2]}" for c in CASES])
def test_rule_fires_on_its_mistake(rule, change, field, severity):
    problems = list(rule(make(change)))
    assert [(p.field, p.severity) for p in problems] == [(field, severity)]
    assert problems[0].fix, "every message says how to fix it"
    assert problems[0].file == "r.yaml"


@pytest.mark.parametrize("key", ["num_iterations", "steps_per_generation", "generation_batch_size"])
def test_grpo_counts_below_one_are_refused(key):
    """GRPOConfig takes 0; GRPOTrainer divides or batches by it at the first step, after sampling."""
    grpo = {"task": "grpo", "dataset": {"formatter": "gsm8k_prompt"}, "training": {"reward_funcs": ["gsm8k"], key: 0}}
    (problem,) = rules.values_in_range(make(grpo))
    assert problem.field == f"training.{key}" and "1 or more" in problem.fix


def test_all_linear_misspelt_is_named():
    """A target_modules string is a regex to peft: "all_linear" matched nothing and peft said only that."""
    (problem,) = rules.names_resolve(make({"peft": {"method": "lora", "target_modules": "ALL_linear"}}))
    assert problem.message == "'ALL_linear' names no module" and problem.fix == "did you mean 'all-linear'?"
    assert not list(rules.names_resolve(make({"peft": {"method": "lora", "target_modules": "all-linear"}})))


def test_misspelt_names_get_the_closest_one_wherever_they_are_read():
    """validate's rule and the loaders that run without it (evaluate's data, a model path) say the same."""
    from lora_ns.builtin_models import resolve_model_path
    from lora_ns.data import formatted_examples
    from lora_ns.errors import UserError

    typo = make({"dataset": {"formatter": "gsm9k"}, "model": {"name_or_path": "builtin:tiny-lama"}})
    fixes = {p.field: p.fix for p in rules.names_resolve(typo)}
    assert fixes == {"dataset.formatter": "did you mean 'gsm8k'?",
                     "model.name_or_path": "did you mean 'builtin:tiny-llama'?"}
    with pytest.raises(UserError, match="unknown formatter 'gsm9k'.*did you mean 'gsm8k'"):
        next(formatted_examples(typo))
    with pytest.raises(UserError, match="model 'builtin:tiny-lama'.*did you mean 'builtin:tiny-llama'"):
        resolve_model_path("builtin:tiny-lama")
    far = make({"dataset": {"formatter": "zzzzzz"}})
    assert list(rules.names_resolve(far))[0].fix.startswith("use one of: alpaca, alpaca_zh,")


@pytest.mark.parametrize("key", sorted(rules.NEEDS_GPU))
def test_gpu_only_settings_without_a_gpu(key, monkeypatch):
    """An error when training, a warning when validating (often on a laptop, for a GPU run later)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = make({"training": {key: True}}) if key != "use_vllm" else grpo_with_vllm()
    for for_training, severity in ((True, "error"), (False, "warning")):
        problems = list(rules.hardware_problems(r, for_training))
        assert [(p.field, p.severity) for p in problems] == [(f"training.{key}", severity)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "vllm" else real(name))
    assert list(rules.hardware_problems(r, True)) == []


def grpo_with_vllm():
    return make({"task": "grpo", "dataset": {"formatter": "gsm8k_prompt"},
                 "training": {"reward_funcs": ["gsm8k"], "use_vllm": True}})


def test_vllm_generation_needs_vllm_where_training_runs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "vllm" else real(name))
    r = grpo_with_vllm()
    for for_training, severity in ((True, "error"), (False, "warning")):
        (problem,) = rules.hardware_problems(r, for_training)
        assert (problem.field, problem.severity) == ("training.use_vllm", severity)
        assert "pip install 'trl[vllm]'" in problem.fix


def test_push_to_hub_needs_the_hub_and_a_login_where_training_runs(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    r = make({"training": {"push_to_hub": True}})

    def problems(offline: bool, token: str | None, for_training: bool) -> list[tuple[str, str]]:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        return [(p.message, p.severity) for p in rules.hub_problems(r, for_training)]

    assert problems(True, "hf_x", True) == [("push_to_hub, but HF_HUB_OFFLINE is set", "error")]
    assert problems(False, None, True) == [("push_to_hub, but no login here", "error")]
    assert problems(False, None, False) == [("push_to_hub, but no login here", "warning")]
    assert problems(False, "hf_x", True) == []
    assert list(rules.hub_problems(make({}), True)) == []


def test_prefix_tuning_is_not_checkpointed_by_default_even_when_quantized():
    """Checkpointing is on by default for a quantized model, and breaks prefix tuning: off for it."""
    from lora_ns.model import gradient_checkpointing

    quantized = {"quantization": {"load_in_4bit": True}}
    assert gradient_checkpointing(make({**quantized, "peft": {"method": "qlora"}}))
    recipe = make({**quantized, "peft": {"method": "prefix_tuning", "num_virtual_tokens": 8}})
    assert not gradient_checkpointing(recipe) and list(rules.checkpointing_fits_method(recipe)) == []


def test_every_rule_has_a_case():
    tested_elsewhere = {rules.output_dir_usable,  # test_output_dir_rules
                        rules.init_adapter_fits,  # tests/test_init_from.py (needs a trained adapter)
                        rules.check_preference_recipe}  # tests/test_preference.py::test_recipe_checks
    assert set(rules.RULES) <= {rule for rule, *_ in CASES} | tested_elsewhere


def test_one_error_line_per_field():
    """lora_dropout: .nan broke two rules (not finite; outside [0, 1)): the first one names it, alone."""
    (problem,) = rules.check_rules(make({"peft": {"lora_dropout": float("nan")}}))
    assert problem.field == "peft.lora_dropout" and "nan is not a finite number" in problem.message


def test_a_good_recipe_breaks_no_rule():
    good = make({"training": {"save_steps": 5, "save_total_limit": 2, "resume_from_checkpoint": "auto"},
                 "model": {"tokenizer_name_or_path": "meta-llama/Llama-3.2-1B"}})
    assert rules.check_rules(good) == []


def test_output_dir_rules(tmp_path):
    as_file = tmp_path / "taken.txt"
    as_file.write_text("x")
    (problem,) = rules.output_dir_usable(make({"training": {"output_dir": str(as_file)}}))
    assert (problem.field, problem.severity) == ("training.output_dir", "error")
    done = tmp_path / "done"
    done.mkdir()
    (done / "run_summary.json").write_text("{}")
    (problem,) = rules.output_dir_usable(make({"training": {"output_dir": str(done)}}))
    assert problem.severity == "warning" and "overwrite_output_dir" in problem.fix
    overwrite = make({"training": {"output_dir": str(done), "overwrite_output_dir": True}})
    assert list(rules.output_dir_usable(overwrite)) == []
    assert list(rules.output_dir_usable(make({"training": {"output_dir": str(tmp_path / "new")}}))) == []


def test_existing_local_paths_pass(tmp_path, tiny_llama):
    assert list(rules.local_model_paths_exist(make({"model": {"name_or_path": tiny_llama}}))) == []
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # empty, whole
    resume = make({"training": {"resume_from_checkpoint": str(checkpoint)}})
    assert list(rules.resume_checkpoint_exists(resume)) == []


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_break_no_rule(path: Path, monkeypatch):
    monkeypatch.chdir(REPO)
    problems = rules.check_rules(load_recipe(path))
    assert [str(p) for p in problems if p.is_error] == []


def test_adalora_beside_a_reference_copy_only_where_the_trainer_makes_one():
    """GRPO keeps a reference model only with beta above 0 (TRL's default is 0); ORPO keeps none."""
    def fired(task: str, method: str, formatter: str, **training) -> list[str]:
        peft = {"method": method, **({"total_step": 10} if method == "adalora" else {})}
        recipe = make({"task": task, "peft": peft, "dataset": {"formatter": formatter},
                       "training": {"reward_funcs": ["gsm8k"], **training} if task == "grpo" else training})
        return [p.fix for p in rules.method_fits_trainer(recipe)]

    assert fired("grpo", "adalora", "gsm8k_prompt", beta=0.04) == ["use lora, or training.beta: 0 (no reference "
                                                                   "model)"]
    assert fired("grpo", "adalora", "gsm8k_prompt") == fired("orpo", "adalora", "preference") == []
    assert fired("orpo", "prefix_tuning", "preference") == fired("dpo", "prompt_tuning", "preference") == []
