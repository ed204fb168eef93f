"""Validate-time model checks: config only, meta device, no weights, no network."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from lora_ns.config import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parent.parent


def recipe_for(model: str = "builtin:tiny-llama", task: str = "causal_lm", quantization: dict | None = None,
               attn: str = "sdpa", **peft):
    seq_cls = task == "seq_cls"
    return parse_recipe({
        "task": task,
        "model": {"name_or_path": model, "dtype": "fp32", "attn_implementation": attn,
                  **({"num_labels": 2} if seq_cls else {})},
        "quantization": quantization or {},
        "peft": {"method": "lora", **peft},
        "dataset": {"path": "sample:glue_mrpc" if seq_cls else "sample:gsm8k",
                    "formatter": "glue_mrpc" if seq_cls else "gsm8k"},
        "training": {"output_dir": "unused", "max_steps": 10},
    }, source="r.yaml")


def errors(problems):
    return [p for p in problems if p.is_error]


def info_counts(problems) -> tuple[int, int]:
    (info,) = [p for p in problems if p.severity == "info"]
    trainable, total = re.search(r"trainable params ([\d,]+) of ([\d,]+)", info.message).groups()
    return int(trainable.replace(",", "")), int(total.replace(",", ""))


def test_missing_target_module_is_named_with_the_linear_layers_there(tiny_llama):
    from lora_ns.validate.model import check_model

    problems = check_model(recipe_for(target_modules=["q_proj", "qkv_proj"]))
    (error,) = errors(problems)
    assert error.field == "peft.target_modules"
    assert "no module named qkv_proj in LlamaForCausalLM" in error.message
    assert "q_proj" not in error.message  # the present one is not reported missing
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in error.fix


@pytest.mark.parametrize("peft", [
    {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
    {"method": "lora", "r": 8, "use_dora": True},
    {"method": "ia3"},
    {"method": "prompt_tuning", "num_virtual_tokens": 5, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Hi"},
    {"method": "prefix_tuning", "num_virtual_tokens": 5},
    {"method": "adalora", "init_r": 6},
    {"method": "full"},
], ids=lambda p: p["method"] + ("_dora" if p.get("use_dora") else ""))
def test_parameter_counts_on_meta_match_the_loaded_model(peft, tiny_llama):
    from lora_ns.adapters import apply_peft, count_parameters
    from lora_ns.model import load_model
    from lora_ns.validate.model import check_model

    recipe = recipe_for(**peft)
    problems = check_model(recipe)
    assert not errors(problems)
    assert info_counts(problems) == count_parameters(apply_peft(load_model(recipe), recipe))


def test_seq_cls_counts_include_the_head_and_modules_to_save_is_checked(tiny_bert):
    from lora_ns.validate.model import check_model

    good = check_model(recipe_for("builtin:tiny-bert", "seq_cls", target_modules=["query", "value"],
                                  modules_to_save=["classifier"]))
    assert not errors(good)
    trainable, _ = info_counts(good)
    lora, head = 2 * 2 * (8 * 64 + 64 * 8), 64 * 2 + 2  # r=8 on query+value of 2 layers; the 64->2 classifier
    assert trainable == lora + head
    # listing another module does not drop the head: peft adds classifier/score to modules_to_save for SEQ_CLS
    pooler = check_model(recipe_for("builtin:tiny-bert", "seq_cls", target_modules=["query", "value"],
                                    modules_to_save=["pooler"]))
    assert not errors(pooler) and info_counts(pooler)[0] == lora + head + 64 * 64 + 64  # + pooler.dense
    bad = errors(check_model(recipe_for("builtin:tiny-bert", "seq_cls", target_modules=["query", "value"],
                                        modules_to_save=["clasifier"])))
    assert [p.field for p in bad] == ["peft.modules_to_save"] and "clasifier" in bad[0].message


def test_quantized_count_is_marked_before_quantization(tiny_llama):
    from lora_ns.validate.model import check_model

    problems = check_model(recipe_for(quantization={"load_in_4bit": True}, method="qlora"))
    assert not errors(problems)
    assert "(before quantization)" in [p for p in problems if p.severity == "info"][0].message


def test_unreachable_hub_model_is_a_warning_without_waiting(monkeypatch):
    """Offline (HF_HUB_OFFLINE here, or no route to the Hub): a warning, and no 25 s of hub retries."""
    import socket

    from huggingface_hub import constants

    from lora_ns.validate.model import check_model

    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
        started = time.time()
        problems = check_model(recipe_for("some-org/not-cached-model-xyz"))
        assert time.time() - started < 10
        (warning,) = problems
        assert warning.severity == "warning" and warning.field == "model.name_or_path"
        assert "model config not reachable" in warning.message and "model checks skipped" in warning.message


def test_missing_flash_attention_is_one_error_where_training_runs(tiny_llama, monkeypatch):
    """flash-attn is CUDA only: validating a GPU recipe on a machine without CUDA warns (and checks the rest);
    with CUDA, or in train's own set-up, it is the error."""
    import importlib.util

    import torch

    from lora_ns.validate.model import check_model

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = recipe_for(attn="flash_attention_2")
    (warning,) = [p for p in check_model(recipe) if p.severity == "warning"]
    assert not errors(check_model(recipe)) and warning.field == "model.attn_implementation"
    for cuda, dry_run in ((True, True), (False, False)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        (error,) = errors(check_model(recipe, dry_run))
        assert error.field == "model.attn_implementation" and "flash-attn" in error.message
        assert "attn_implementation: sdpa" in error.fix and "\n" not in str(error)
    # pretrain builds its own model, so validate checks only the attention package there
    from lora_ns.setup import Checks, deep_problems

    pretrain = load_recipe(REPO / "recipes" / "pretrain_124m.yaml", ["model.attn_implementation=flash_attention_2"])
    for cuda, dry_run, severity in ((False, True, "warning"), (False, False, "error")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        (problem,) = deep_problems(pretrain, Checks(data=False), dry_run)
        assert (problem.field, problem.severity) == ("model.attn_implementation", severity)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_apply_to_a_builtin_model_of_their_family(path, tiny_llama, tiny_qwen2, tiny_bert):
    """Offline the shipped models are unreachable (a warning, checks skipped), so swap each for the builtin
    tiny model of the same family: the recipe's own peft method, target_modules, quantization and task
    must apply there, and the reported counts must be an adapter's (or everything, for full)."""
    from lora_ns.validate.model import check_model

    recipe = load_recipe(path)
    qwen = "qwen" in recipe.model.name_or_path.lower()
    family = "bert" if recipe.task == "seq_cls" else "qwen2" if qwen else "llama"
    # the stand-in's context (2048 positions) is shorter than the shipped models': legal_cpt's 4096 would warn
    shorter = ["training.max_length=2048"] if (recipe.training.get("max_length") or 0) > 2048 else []
    recipe = load_recipe(path, [f"model.name_or_path=builtin:tiny-{family}", *shorter])
    problems = check_model(recipe)
    assert not errors(problems) and not [p for p in problems if p.severity == "warning"], problems
    trainable, total = info_counts(problems)
    assert 0 < trainable <= total and (trainable == total) == (recipe.peft.method == "full")


@pytest.mark.parametrize("peft, field, words", [
    ({"method": "prompt_tuning", "prompt_tuning_init": "TEXT"}, "peft.prompt_tuning_init",
     "prompt_tuning_init_text"),
    ({"method": "adalora", "total_step": 10, "tinit": 8, "tfinal": 5}, "peft.tfinal", "budgeting phase"),
    ({"method": "lora", "r": 0}, "peft.r", "positive"),
])
def test_peft_config_values_peft_rejects_are_one_error_naming_the_field(peft, field, words, tiny_llama):
    """Through train's set-up: peft's config checks (TEXT init, AdaLoRA phases), then the meta model's (r).
    (A lora_dropout outside [0, 1) is a recipe rule before these: test_rules.)"""
    from lora_ns.errors import UserError
    from lora_ns.setup import Checks, setup

    with pytest.raises(UserError) as raised:
        setup(recipe_for(**peft), dry_run=True, checks=Checks(data=False))
    (error,) = raised.value.problems
    assert error.field == field and words in error.message and "\n" not in str(error)
    assert error.fix == f"fix {field} (see the peft config docs)"


def test_model_folder_that_does_not_exist_is_an_error(tmp_path):
    from lora_ns.errors import UserError
    from lora_ns.setup import Checks, setup

    with pytest.raises(UserError) as raised:
        setup(recipe_for(str(tmp_path / "no-such-model")), dry_run=True, checks=Checks(data=False))
    (error,) = raised.value.problems
    assert error.is_error and error.field == "model.name_or_path" and "not found" in error.message


def test_an_adapter_folder_as_the_model_says_how_to_use_it(tmp_path):
    """A training output named as model.name_or_path (a common slip on the way from SFT to DPO)."""
    from lora_ns.model import model_folder_problem

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}', encoding="utf-8")
    problem = model_folder_problem(recipe_for(str(tmp_path)))
    assert problem.message == f"{tmp_path} holds an adapter, not a model"
    assert problem.fix.startswith(f"set peft.init_from: {tmp_path} to train it further")


def test_a_tokenizer_training_would_stop_on_is_refused_by_validate_and_by_train(tmp_path, capsys, tiny_llama,
                                                                                 tiny_bert):
    """Another model's tokenizer: ids past the embedding rows (an IndexError at the first batch holding one),
    or no EOS token (TRL's preparation ends every example with it: a TypeError). validate names the field;
    train refuses too, with its checks off (the net after the weights load, for a model validate cannot reach)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_ns.errors import UserError, run_cli
    from lora_ns.setup import Checks
    from lora_ns.train import train
    from lora_ns.validate.__main__ import main as validate_main

    small = tmp_path / "small-vocab"  # tiny-llama's tokenizer (1,024 tokens) on a model of 512 rows
    config = AutoConfig.from_pretrained(tiny_llama, vocab_size=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(small)
    cases = [({"name_or_path": str(small)}, "model.name_or_path", "the tokenizer has 1,024 tokens (its "
              "vocabulary), the model's embeddings 512 rows"),
             ({"name_or_path": "builtin:tiny-llama", "tokenizer_name_or_path": "builtin:tiny-bert"},
              "model.tokenizer_name_or_path", "the tokenizer has no EOS token")]
    for model, field, words in cases:
        path = tmp_path / "r.yaml"
        recipe = recipe_for()
        recipe = parse_recipe({**recipe.model_dump(exclude_unset=True), "model": {**model, "dtype": "fp32"},
                               "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}, str(path))
        path.write_text(yaml.safe_dump(recipe.model_dump(exclude_unset=True)))
        capsys.readouterr()
        assert run_cli("lora_ns.validate", lambda: validate_main([str(path)])) == 2
        (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
        assert f" {field}: {words}" in line, line
        with pytest.raises(UserError) as err:
            train(recipe, Checks(data=False, model=False))
        assert err.value.problems[0].field == field and words in err.value.problems[0].message
        assert not (tmp_path / "out" / "run_summary.json").exists()


def test_an_adapter_merge_cannot_fold_is_a_warning(tiny_llama):
    from lora_ns.validate.model import check_model

    (warning,) = [p for p in check_model(recipe_for(lora_bias=True)) if p.severity == "warning"]
    assert warning.field == "peft.lora_bias" and "a layer without a bias" in warning.message
    assert not [p for p in check_model(recipe_for()) if p.severity == "warning"]


def test_a_max_length_past_the_models_positions(tiny_bert, tiny_llama):
    """BERT's learned position embeddings are indexed out of range by a longer row (an error: training would
    stop there, mid-run); a rotary model runs on over positions it never trained on (a warning)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lora_ns.validate.model import check_model

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    context = bert.config.max_position_embeddings
    with pytest.raises((IndexError, RuntimeError)):  # what the error line promises
        bert(input_ids=torch.ones(1, context + 1, dtype=torch.long))

    def line(recipe, length):
        recipe.training["max_length"] = length
        return [p for p in check_model(recipe) if p.field == "training.max_length"]

    assert line(recipe_for("builtin:tiny-bert", "seq_cls"), context) == []
    (problem,) = line(recipe_for("builtin:tiny-bert", "seq_cls"), context + 1)
    assert problem.is_error and f"longer than the model's {context} positions" in problem.message
    assert problem.fix == f"set training.max_length: {context} or less"
    (problem,) = line(recipe_for(), 4096)
    assert problem.severity == "warning" and "never trained" in problem.message


def test_a_grpo_completion_must_leave_room_for_a_prompt_in_the_positions():
    """GRPO generates max_completion_length tokens after the whole prompt: on learned positions (GPT-2) the
    first completion that long indexes past them mid-generation (an error); rotary ones run on (a warning)."""
    from accelerate import init_empty_weights
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lora_ns.config import parse_recipe
    from lora_ns.validate.model import context_problem

    def recipe(length: int):
        return parse_recipe({"task": "grpo", "model": {"name_or_path": "builtin:tiny-llama"},
                             "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k_prompt"},
                             "training": {"reward_funcs": ["gsm8k"], "max_completion_length": length}}, "g.yaml")

    with init_empty_weights():
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2))
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, max_position_embeddings=64))
    assert context_problem(recipe(63), gpt2) is None
    problem = context_problem(recipe(64), gpt2)
    assert problem.is_error and problem.field == "training.max_completion_length"
    assert "leaves no room for a prompt in the model's 64 positions" in problem.message
    assert context_problem(recipe(64), llama).severity == "warning"


def test_a_grpo_completion_after_the_longest_sampled_prompt_past_the_positions_is_warned(tiny_llama):
    from lora_ns.config import parse_recipe
    from lora_ns.validate.data import check_dataset

    def warned(length: int):
        recipe = parse_recipe({"task": "grpo", "model": {"name_or_path": "builtin:tiny-llama"},
                               "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k_prompt", "max_samples": 8},
                               "training": {"reward_funcs": ["gsm8k"], "max_completion_length": length}}, "g.yaml")
        return [p for p in check_dataset(recipe) if p.field == "training.max_completion_length"]

    context = 2048  # tiny-llama's positions; GSM8K prompts in its chat template are 60-200 tokens
    assert warned(context - 300) == []
    (problem,) = warned(context - 10)
    assert problem.severity == "warning" and f"pass the model's {context} positions" in problem.message
    longest = int(problem.message.split("(")[1].split()[0])
    assert problem.fix == f"set it to {context - longest} or less, or shorten the prompts" and longest > 10


def test_a_router_loss_coefficient_needs_a_mixture_of_experts_model():
    """TRL's trainers refuse router_aux_loss_coef on a model without a router, once the weights have loaded."""
    from transformers import LlamaConfig, Qwen2MoeConfig

    from lora_ns.config import parse_recipe
    from lora_ns.validate.model import router_problem

    def recipe(**training):
        return parse_recipe({"task": "dpo", "model": {"name_or_path": "builtin:tiny-llama"},
                             "dataset": {"path": "sample:preference", "formatter": "preference"},
                             "training": training})

    problem = router_problem(recipe(router_aux_loss_coef=0.01), LlamaConfig())
    assert problem.field == "training.router_aux_loss_coef" and "Llama is not a Mixture-of-Experts" in problem.message
    assert router_problem(recipe(router_aux_loss_coef=0.01), Qwen2MoeConfig()) is None
    assert router_problem(recipe(), LlamaConfig()) is None


def test_prefix_tuning_where_generate_ignores_the_prefix(monkeypatch, tiny_llama):
    """Where the probe finds generate ignoring the prefix: GRPO (which learns from its own samples) is refused,
    an SFT run warned (its adapter trains, but cannot be asked); where it works, neither."""
    from lora_ns.validate import model as model_check
    from lora_ns.validate.model import check_model

    def said(task: str, broken: str | None):
        monkeypatch.setattr(model_check, "prefix_generation_problem", lambda: broken)
        grpo = {"dataset": {"path": "sample:gsm8k", "formatter": "gsm8k_prompt"},
                "training": {"reward_funcs": ["gsm8k"]}} if task == "grpo" else {}
        recipe = parse_recipe({"task": task, "model": {"name_or_path": "builtin:tiny-llama"},
                               "peft": {"method": "prefix_tuning", "num_virtual_tokens": 4},
                               "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"}, **grpo}, "r.yaml")
        return [(p.severity, p.message) for p in check_model(recipe) if p.field == "peft.method"
                and p.severity != "info"]

    assert said("grpo", "it ignores the prefix") == [("error", "it ignores the prefix: GRPO would learn from the "
                                                             "untuned model's samples")]
    assert [severity for severity, _ in said("causal_lm", "it ignores the prefix")] == ["warning"]
    assert said("grpo", None) == said("causal_lm", None) == []


def test_weights_larger_than_this_machine_warn_when_no_gpu_is_visible(monkeypatch, tiny_llama):
    """Training with no GPU holds the weights in this machine's memory: a model whose weights alone exceed it
    was found out after loading began (a 10^12-class head was OOM-killed). A warning: validate often runs on a
    laptop for a GPU machine."""
    import os

    from transformers import AutoModelForCausalLM

    from lora_ns.validate.model import check_model

    fp32 = 4 * AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters()

    def machine(memory: int) -> None:
        pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": memory // 4096}
        monkeypatch.setattr(os, "sysconf", pages.__getitem__)

    def warned(recipe) -> list[str]:
        return [p.severity for p in check_model(recipe) if "no GPU is visible" in p.message]

    machine(fp32 // 2)  # half the weights' bytes
    assert warned(recipe_for()) == ["warning"]
    machine(fp32 * 2)
    assert warned(recipe_for()) == []
    machine(fp32 // 4)  # 4-bit weights take an eighth of fp32's bytes
    assert warned(recipe_for(quantization={"load_in_4bit": True})) == []
    machine(fp32 // 2)  # validate --gpu-memory checks for a GPU machine: this one's memory is not the question
    assert not [p for p in check_model(recipe_for(), this_machine=False) if "no GPU is visible" in p.message]
