"""Preference and RL tasks (dpo, orpo, kto, grpo): formatters, file/line errors, rewards, recipe checks,
and real training on the tiny offline Llama: DPO raises the chosen-minus-rejected margin on its rows,
GRPO raises a reward the model can learn in a few steps."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lora_ns.config import parse_recipe
from lora_ns.data.formatters import FORMATTERS, RowError
from lora_ns.errors import UserError
from lora_ns.evaluate import preference_margin
from lora_ns.preference import check_preference_recipe
from lora_ns.rewards import answer_format, completion_text, gsm8k_exact_match, resolve_rewards

SAMPLE = {"dpo": ("preference", "preference"), "orpo": ("ultrafeedback", "ultrafeedback"),
          "kto": ("kto", "kto"), "grpo": ("gsm8k", "gsm8k_prompt")}


def recipe_for(task: str, out: Path | str = "out", data: str | None = None, formatter: str | None = None,
               peft: dict | None = None, **training):
    sample, fmt = SAMPLE[task]
    return parse_recipe({
        "task": task, "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "peft": peft or {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                         "target_modules": "all-linear"},
        "dataset": {"path": data or f"sample:{sample}", "formatter": formatter or fmt},
        "training": {"output_dir": str(out), "report_to": "none", "save_strategy": "no", "logging_steps": 1,
                     "seed": 0, **training}})


def the_setup_error(recipe) -> object:
    """The one problem train's set-up (validate's too) refuses `recipe` with."""
    from lora_ns.setup import setup

    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    (problem,) = err.value.problems
    return problem


# --- formatters -------------------------------------------------------------------------------------

def test_layouts_share_one_canonical_pair():
    user = {"role": "user", "content": "2+2?"}
    want = {"prompt": [user], "chosen": "4", "rejected": "5"}
    assert FORMATTERS["preference"]({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == want
    conv = {"chosen": [user, {"role": "assistant", "content": "4"}],
            "rejected": [user, {"role": "assistant", "content": "5"}]}
    assert FORMATTERS["ultrafeedback"](conv) == want
    assert FORMATTERS["preference"](conv) == want  # implicit prompt
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
          "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5"}
    split = FORMATTERS["hh_rlhf"](hh)
    assert split["prompt"][-1] == user and len(split["prompt"]) == 3
    assert (split["chosen"], split["rejected"]) == ("4", "5")
    assert FORMATTERS["kto"]({"prompt": "2+2?", "completion": "4", "label": "true"})["label"] is True
    assert FORMATTERS["gsm8k_prompt"]({"question": "1+1?", "answer": "#### 2"})["answer"] == "#### 2"


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
    ({"prompt": "q", "chosen": "same", "rejected": " same"}, "rejected", "same as 'chosen'"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen", "empty completion"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "rejected", "differs from 'chosen'"),
])
def test_bad_pairs_name_the_field(row, field, words):
    with pytest.raises(RowError) as err:
        FORMATTERS["preference"](row)
    assert err.value.field == field and words in err.value.message


def test_bad_rows_are_file_line_errors(tmp_path, tiny_llama):
    from lora_ns.data import build_datasets
    from lora_ns.model import load_tokenizer

    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    rows = [good, good, {"prompt": "q", "chosen": "a"}, good]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for("dpo", tmp_path / "out", data=str(path))
    with pytest.raises(UserError) as err:
        build_datasets(recipe, load_tokenizer(recipe))
    (problem,) = err.value.problems
    assert (problem.file, problem.line, problem.field) == (str(path), 3, "rejected")
    assert "\n" not in str(problem)

    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "q", "completion": "a", "label": "maybe"}) + "\n")
    with pytest.raises(UserError) as err:
        build_datasets(recipe_for("kto", data=str(kto)), load_tokenizer(recipe))
    assert err.value.problems[0].line == 1 and "expected true or false" in err.value.problems[0].message


def test_validate_reports_a_bad_row_with_its_line(tmp_path, capsys):
    from lora_ns.validate import main

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" +
                    json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"task: dpo\nmodel: {{name_or_path: builtin:tiny-llama}}\n"
                      f"dataset: {{path: {path}, formatter: preference}}\n")
    assert main([str(recipe), "--no-model"]) == 2
    assert f"{path}:2: rejected: is the same as 'chosen'" in capsys.readouterr().err



def test_kto_labels_of_one_kind_or_unbalanced_weights_are_warnings(tmp_path, capsys):
    """KTO with one kind of label trains in one direction only; an imbalance the weights do not offset is
    outside TRL's recommended range, which TRL logs only once training has started."""
    from lora_ns.validate import main

    path, recipe = tmp_path / "kto.jsonl", tmp_path / "kto.yaml"
    recipe.write_text(f"task: kto\nmodel: {{name_or_path: builtin:tiny-llama}}\n"
                      f"dataset: {{path: {path}, formatter: kto}}\n")
    for labels, extra, words in (
            ([True] * 6, [], "label: desirable: 6, undesirable: 0 of 6 sampled rows: KTO learns from both"),
            ([True] * 4 + [False] * 2, [], "training.desirable_weight: desirable: 4, undesirable: 2 of 6 "
                                           "sampled rows: the weights leave them unbalanced — set "
                                           "training.desirable_weight in [0.50, 0.67]"),
            ([True] * 4 + [False] * 2, ["training.desirable_weight=0.6"], None),  # 4 x 0.6 / 2 = 1.2: in range
            ([True, False] * 3, [], None)):
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a", "label": label}) + "\n"
                                for i, label in enumerate(labels)))
        assert main([str(recipe), "--no-model", *extra]) == 0
        lines = [x for x in capsys.readouterr().err.splitlines() if "desirable: " in x]
        assert len(lines) == 1 and (" warning: " in lines[0]) == bool(words), lines
        assert words is None or words in lines[0], lines[0]


# --- rewards and recipe checks -------------------------------------------------------------------------

def test_builtin_rewards():
    completions = ["so 3 + 4 = 7\n#### 7", "#### 8", "the answer is 7", [{"role": "assistant", "content": "#### 7"}]]
    assert gsm8k_exact_match(completions, answer=["... #### 7"] * 4) == [1.0, 0.0, 1.0, 1.0]
    assert answer_format(completions) == [1.0, 1.0, 0.0, 1.0]


def length_penalty(prompts, completions, **kwargs):
    """A user reward named by dotted path in the tests below (this module is importable)."""
    return [-len(c) / 100 for c in completions]


def not_a_reward(text):
    return 0.0


def test_user_rewards_are_checked_before_training():
    funcs, reasons = resolve_rewards(["gsm8k", "test_preference:length_penalty"])
    assert funcs == [gsm8k_exact_match, length_penalty] and reasons == []
    _, reasons = resolve_rewards(["no_such_pkg.rewards:f", "test_preference:missing",
                                  "test_preference:not_a_reward", "lenght"])
    assert [r.split(" ")[0] for r in reasons] == ["cannot", "module", "'test_preference:not_a_reward'", "unknown"]
    assert "fn(prompts, completions, **kwargs)" in reasons[2]
    assert all("\n" not in r for r in reasons)


def test_one_dpo_loss_by_name_is_accepted_as_trl_accepts_it():
    """DPOConfig.loss_type is a list, and TRL wraps a single name ("loss_type: ipo", as tutorials write it);
    the recipe's type check refused the string."""
    from lora_ns.setup import training_arguments

    recipe = recipe_for("dpo", loss_type="ipo")
    assert recipe.training["loss_type"] == ["ipo"] and check_preference_recipe(recipe) == []
    assert training_arguments(recipe).loss_type == ["ipo"]
    with pytest.raises(UserError, match="training.loss_type: expected list"):
        recipe_for("dpo", loss_type=3)  # not a name: still refused


def test_trl_checks_the_generation_batch_naming_the_field():
    from lora_ns.setup import training_arguments

    with pytest.raises(UserError) as err:
        training_arguments(recipe_for("grpo", num_generations=3, per_device_train_batch_size=8,
                                      reward_funcs=["gsm8k"]))
    (problem,) = err.value.problems
    assert problem.field == "training.num_generations" and "divisible by num_generations" in problem.message
    assert "per_device_train_batch_size x processes" in problem.fix  # TRL counts the processes too


@pytest.mark.parametrize("task, training, field, words", [
    ("grpo", {"num_generations": 1, "reward_funcs": ["gsm8k"]}, "training.num_generations", "2 or more"),
    ("grpo", {"reward_funcs": ["nope.nope:f"]}, "training.reward_funcs", "cannot import"),
    ("dpo", {"beta": 0}, "training.beta", "out of range"),
    ("orpo", {"max_length": 256, "max_completion_length": 256}, "training.max_completion_length", "no room"),
    ("dpo", {"sync_ref_model": True}, "training.sync_ref_model", "no copy to sync"),
    ("dpo", {"loss_type": ["sft", "sigmoidx"]}, "training.loss_type", "did you mean 'sigmoid'?"),
    ("grpo", {"reward_funcs": ["gsm8k"], "reward_weights": [1.0, 2.0]}, "training.reward_weights",
     "one weight per"),
    ("grpo", {"reward_funcs": ["gsm8k"], "loss_type": "dapox"}, "training.loss_type", "did you mean 'dapo'?"),
    ("grpo", {"reward_funcs": ["gsm8k"], "temperature": 0.0}, "training.temperature", "must be above 0"),
    ("grpo", {"reward_funcs": ["gsm8k"], "top_entropy_quantile": -0.5}, "training.top_entropy_quantile",
     "in [0, 1]"),
    ("grpo", {"reward_funcs": ["gsm8k"], "remove_unused_columns": True}, "training.remove_unused_columns",
     "the reference answer"),
    ("grpo", {"reward_funcs": ["gsm8k"], "top_p": 0.0}, "training.top_p", "each advantage is 0"),
    ("grpo", {"reward_funcs": ["gsm8k"], "top_k": 1}, "training.top_k", "GRPO learns nothing"),
    ("kto", {"loss_type": "apo_zero"}, "training.loss_type", "did you mean 'apo_zero_unpaired'?"),
    ("dpo", {"f_divergence_type": "js"}, "training.f_divergence_type", "js_divergence"),
    ("kto", {"desirable_weight": -1.0}, "training.desirable_weight", "must be above 0"),
    ("kto", {"per_device_train_batch_size": 1}, "training.per_device_train_batch_size", "from the other rows"),
    ("dpo", {"use_weighting": True, "loss_type": ["sigmoid", "aot"]}, "training.use_weighting", "sorts the rows"),
    ("dpo", {"loss_type": "exo_pair"}, "training.label_smoothing", "label_smoothing: 0.001"),
    ("orpo", {"train_sampling_strategy": "group_by_length"}, "training.train_sampling_strategy", "input_ids"),
    ("kto", {"train_sampling_strategy": "random"}, "training.train_sampling_strategy", "KTO samples in order"),
    ("grpo", {"reward_funcs": ["gsm8k"], "epsilon": -0.2}, "training.epsilon", "must be above 0"),
    ("grpo", {"reward_funcs": ["gsm8k"], "scale_rewards": "std"}, "training.scale_rewards", "group, batch, none"),
    ("grpo", {"reward_funcs": ["gsm8k"], "importance_sampling_level": "seq"}, "training.importance_sampling_level",
     "did you mean 'sequence'?"),
    ("grpo", {"reward_funcs": ["gsm8k"], "multi_objective_aggregation": "sum"},
     "training.multi_objective_aggregation", "sum_then_normalize"),
    ("grpo", {"reward_funcs": ["gsm8k"], "vllm_importance_sampling_mode": "truncate"},
     "training.vllm_importance_sampling_mode", "token_truncate"),
    ("grpo", {"reward_funcs": ["gsm8k"], "top_k": -5}, "training.top_k", "strictly positive integer"),
    ("grpo", {"reward_funcs": ["gsm8k"], "repetition_penalty": 0.0}, "training.repetition_penalty",
     "strictly positive float"),
    ("grpo", {"reward_funcs": ["gsm8k"], "min_p": 2.0}, "training.min_p", "[0, 1] interval"),
])
def test_recipe_checks(task, training, field, words):
    (problem,) = check_preference_recipe(recipe_for(task, **training))
    assert problem.field == field and words in f"{problem.message} {problem.fix}"


def test_grpo_sync_ref_model_needs_a_reference_beta_above_0():
    """GRPO's beta defaults to 0, and then it keeps no reference model: TRL refused sync_ref_model as the
    trainer started, after the weights had loaded."""
    recipe = recipe_for("grpo", peft={"method": "full"}, reward_funcs=["gsm8k"], sync_ref_model=True)
    (problem,) = check_preference_recipe(recipe)
    assert problem.field == "training.sync_ref_model" and "beta 0" in problem.message
    assert check_preference_recipe(recipe_for("grpo", peft={"method": "full"}, reward_funcs=["gsm8k"],
                                              sync_ref_model=True, beta=0.04)) == []


def test_generate_during_eval_without_a_logger_for_its_samples(monkeypatch):
    """ORPOTrainer refuses generate_during_eval without wandb or comet, once the weights have loaded."""
    import importlib.util

    from lora_ns.validate.rules import check_rules

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "comet_ml")
                        else real(name, *a))
    recipe = recipe_for("orpo", generate_during_eval=True)
    for for_training, severity in ((False, "warning"), (True, "error")):
        (problem,) = [p for p in check_rules(recipe, for_training) if p.field == "training.generate_during_eval"]
        assert problem.severity == severity and "Weights & Biases or Comet" in problem.message


def test_orpo_cannot_stream_nor_a_precomputed_reference():
    """TRL's experimental ORPOTrainer maps its data with num_proc, which a stream does not take: a TypeError
    as the trainer started; the other preference trainers stream."""
    recipe = recipe_for("orpo")
    recipe.dataset.streaming = True
    (problem,) = check_preference_recipe(recipe)
    assert problem.field == "dataset.streaming" and "cannot read a stream" in problem.message
    for task in ("dpo", "kto"):
        streamed = recipe_for(task)
        streamed.dataset.streaming = True
        assert check_preference_recipe(streamed) == []
        streamed.training["precompute_ref_log_probs"] = True  # refused as the trainer started
        (problem,) = check_preference_recipe(streamed)
        assert problem.field == "training.precompute_ref_log_probs" and "whole data set" in problem.message


def test_kto_without_a_kl_term_takes_one_row_batches_in_any_order():
    recipe = recipe_for("kto", per_device_train_batch_size=1, train_sampling_strategy="random",
                        loss_type="apo_zero_unpaired")
    assert check_preference_recipe(recipe) == []


@pytest.mark.parametrize("value, read", [(False, "none"), (True, "group")])
def test_scale_rewards_takes_the_booleans_trl_documents(value, read):
    """GRPOConfig maps scale_rewards true/false to 'group'/'none'; the recipe's type check refused them."""
    recipe = recipe_for("grpo", reward_funcs=["gsm8k"], scale_rewards=value)
    assert recipe.training["scale_rewards"] == read and check_preference_recipe(recipe) == []


def test_orpo_validates_without_trls_experimental_notice():
    """ORPOConfig lives in trl.experimental, whose import printed a Python warning (two lines, one naming
    importlib) amid validate's report; the README and the ORPO recipe say it is experimental."""
    import subprocess
    import sys

    from conftest import REPO

    run = subprocess.run([sys.executable, "-m", "lora_ns.validate", "recipes/orpo_hh_rlhf.yaml", "--no-model",
                          "model.name_or_path=builtin:tiny-llama", "dataset.path=sample:hh_rlhf",
                          "dataset.val_split=0.25"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "OK recipes/orpo_hh_rlhf.yaml" in run.stdout, run.stderr[-1000:]
    assert "trl.experimental" not in run.stderr and "Warning" not in run.stderr, run.stderr[-1000:]


def test_validate_builds_a_preference_config_with_sft_only_keys_absent(tmp_path):
    """DPOConfig has padding_free but no packing: the set-up's SFT-only checks must not assume packing."""
    from lora_ns.setup import setup

    assert setup(recipe_for("dpo", tmp_path / "out", padding_free=True, max_steps=1), dry_run=True).args.padding_free


def test_best_model_metric_must_be_one_the_task_reports(tmp_path):
    """'accuracy' is a classification metric: DPO reports rewards/accuracies, and the Trainer would stop at
    the first evaluation after the weights load."""
    recipe = recipe_for("dpo", tmp_path / "out", eval_strategy="steps", eval_steps=1, max_steps=1,
                        metric_for_best_model="accuracy")
    recipe.dataset.val_split = 0.25
    problem = the_setup_error(recipe)
    assert problem.field == "training.metric_for_best_model" and "rewards/accuracies" in problem.fix


def test_grpo_eval_batches_name_the_eval_batch_size(tmp_path):
    """GRPOConfig's "global eval batch size ... must be divisible by the number of generations" named no key:
    the line said "training: ... fix training"."""
    recipe = recipe_for("grpo", tmp_path / "out", reward_funcs=["gsm8k"], num_generations=2, eval_strategy="steps",
                        eval_steps=1, per_device_eval_batch_size=3)
    recipe.dataset.val_split = 0.25
    problem = the_setup_error(recipe)
    assert problem.field == "training.per_device_eval_batch_size" and "multiple of num_generations" in problem.fix


def test_grpo_cache_implementation_is_one_transformers_knows(tmp_path):
    """GenerationConfig refuses an unknown one as GRPOTrainer starts, after the weights load. Checked with the
    built arguments (transformers is imported there anyway), not among the recipe rules."""
    recipe = recipe_for("grpo", tmp_path / "out", reward_funcs=["gsm8k"], num_generations=2, max_steps=1,
                        cache_implementation="statik")
    problem = the_setup_error(recipe)
    assert problem.field == "training.cache_implementation" and problem.fix == "did you mean 'static'?"


@pytest.mark.parametrize("task", ["dpo", "kto"])
def test_prompts_that_fill_max_length_are_found_before_training(tmp_path, task):
    """DPOTrainer and KTOTrainer drop a row whose prompt alone fills max_length; at 8 tokens every sampled
    prompt does, and training started with no rows (a sampler error after the weights load; KTO's was not
    checked at all)."""
    from lora_ns.setup import setup

    with pytest.raises(UserError) as err:
        setup(recipe_for(task, tmp_path / "out", max_length=8), dry_run=True)
    (problem,) = err.value.problems
    assert problem.field == "training.max_length" and "prompts that fill max_length=8" in problem.message
    assert problem.message.startswith(f"{len(json_rows(SAMPLE[task][0]))} of ")  # every sampled row
    assert setup(recipe_for(task, tmp_path / "out", max_length=512), dry_run=True).args.max_length == 512


def reward_answer_takes(prompts, completions, answer, **kwargs):
    """A user reward that needs the row's reference (no default)."""
    return [float(str(answer) in c) for c in completions]


def test_rewards_scored_against_an_answer_the_rows_lack_are_found_before_training(tmp_path):
    """prompt_only rows without an answer column gave the gsm8k reward None for every row: each completion
    scored 0 and GRPO trained on no signal, for as many GPU hours as it ran. With a few rows lacking one it
    is a warning; rows whose answer holds no number cannot score under gsm8k either."""
    from lora_ns.setup import setup

    rows = tmp_path / "prompts.jsonl"
    prompts = [{"prompt": f"What is {i} + {i}?"} for i in range(4)]
    rows.write_text("\n".join(json.dumps(r) for r in prompts), encoding="utf-8")
    for rewards in (["gsm8k"], ["format", "test_preference:reward_answer_takes"]):
        with pytest.raises(UserError) as err:
            setup(recipe_for("grpo", tmp_path / "out", data=str(rows), formatter="prompt_only",
                             reward_funcs=rewards, max_steps=1), dry_run=True)
        (problem,) = err.value.problems
        assert problem.field == "training.reward_funcs" and "4 of 4 sampled rows have no" in problem.message
        assert rewards[-1] in problem.message and "dataset.columns.answer" in problem.fix
    answers = ["#### 2", "the sum is 4", "six", None]
    rows.write_text("\n".join(json.dumps({**r, "answer": a}) for r, a in zip(prompts, answers)), encoding="utf-8")
    found = setup(recipe_for("grpo", tmp_path / "out", data=str(rows), formatter="prompt_only",
                             reward_funcs=["gsm8k", "format"], max_steps=1), dry_run=True).notes
    (warning,) = [p for p in found if p.field == "training.reward_funcs"]
    assert warning.severity == "warning" and "2 of 4 sampled rows have no number in their answer" in warning.message


def json_rows(sample: str) -> list[dict]:
    return [json.loads(line) for line in (Path(__file__).parents[1] / f"lora_ns/samples/{sample}.jsonl")
            .read_text(encoding="utf-8").splitlines() if line.strip()]


def test_formatter_must_fit_the_task():
    (problem,) = check_preference_recipe(recipe_for("dpo", formatter="gsm8k"))
    assert problem.field == "dataset.formatter" and "hh_rlhf" in problem.fix
    assert check_preference_recipe(recipe_for("kto")) == []
    assert check_preference_recipe(recipe_for("dpo", loss_type=["sigmoid", "sft"])) == []


NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
             "supported') }}{% endif %}{{ m['content'] }}{% endfor %}")


def test_a_grpo_prompt_the_template_refuses_stops_the_run_before_the_weights_load(tmp_path, monkeypatch):
    """GRPO renders its prompts as it samples: a prompt past validate's sample that the chat template refuses
    (Gemma's on a system turn) stopped the run at that step, after the weights loaded and sampled. Train's
    set-up now renders one prompt of each role sequence in the whole data first."""
    import lora_ns.train
    from lora_ns.setup import Checks

    def no_weights(*_, **__):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(lora_ns.train, "load_model", no_weights)
    recipe = recipe_for("grpo", tmp_path / "out", reward_funcs=["gsm8k"], num_generations=2, max_steps=1,
                        per_device_train_batch_size=2, max_completion_length=4)
    recipe.model.chat_template, recipe.dataset.system_prompt = NO_SYSTEM, "Be brief."
    with pytest.raises(UserError, match="refuses a conversation in the data: System role not supported"):
        lora_ns.train.run_training(recipe, Checks(data=False))  # as rows validate did not sample


def test_reward_funcs_only_for_grpo():
    with pytest.raises(UserError) as err:
        recipe_for("dpo", reward_funcs=["gsm8k"])
    assert err.value.problems[0].field == "training.reward_funcs"


# --- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["dpo", "orpo", "kto"])
def test_task_trains_evaluates_and_saves_an_adapter(task, tmp_path):
    """The evaluation reports every metric validate accepts as metric_for_best_model for the task."""
    from lora_ns.train import run_training
    from lora_ns.validate.arguments import EVAL_METRICS

    recipe = recipe_for(task, tmp_path / "out", max_steps=2, per_device_train_batch_size=4, max_length=128,
                        eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    recipe.dataset.val_split = 0.25
    trainer, summary = run_training(recipe)
    assert summary["steps"] == 2 and summary["last_loss"] is not None
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    (reported,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert {f"eval_{name}" for name in EVAL_METRICS[task]} <= set(reported), sorted(reported)


def test_dpo_raises_the_preference_margin(tmp_path):
    """The adapter starts as a no-op (LoRA B = 0), so adapter-off is the model before training."""
    from lora_ns.train import run_training

    recipe = recipe_for("dpo", tmp_path / "out", max_steps=16, per_device_train_batch_size=4,
                        learning_rate=1e-2, lr_scheduler_type="constant", beta=0.1, max_length=128)
    trainer, _ = run_training(recipe)
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "lora_ns/samples/preference.jsonl")
            .read_text().splitlines()]

    loaded = SimpleNamespace(model=model, tokenizer=tokenizer)

    def margins() -> list[float]:
        return [preference_margin(loaded, {**r, "prompt": [{"role": "user", "content": r["prompt"]}]}, recipe)
                for r in rows]
    after = margins()
    with model.disable_adapter():
        before = margins()
    gains = [a - b for a, b in zip(after, before)]
    print("mean gain", sum(gains) / len(gains))
    # DPO's loss on a row is -log sigmoid(beta * gain): log 2 = 0.69 at gain 0, 0.60 at a gain of 2 nats
    # (beta 0.1). Demand that mean gain on the training rows; sequence log-probs here are ~ -100 to -250 nats,
    # so 2 nats is far above fp32 rounding (~1e-5 relative).
    assert sum(gains) / len(gains) > 2.0, gains
    assert sum(g > 0 for g in gains) >= 0.8 * len(gains), gains

    # lora_ns.evaluate scores the saved adapter the same way: preference accuracy and mean margin
    from lora_ns.evaluate import main as evaluate

    sample = Path(__file__).parents[1] / "lora_ns/samples/preference.jsonl"
    assert evaluate([str(tmp_path / "out" / "recipe.yaml"), "--adapter", str(tmp_path / "out"),
                     "--data-file", str(sample), "--output-dir", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["kind"] == "preference" and metrics["num_examples"] == len(rows)
    assert metrics["preference_accuracy"] == sum(m > 0 for m in after) / len(after)
    # same model and tokens, reloaded from disk: equal up to fp32 rounding of ~100-nat sums (1e-5 relative)
    assert abs(metrics["mean_margin"] - sum(after) / len(after)) < 1e-3 * max(1.0, abs(sum(after) / len(after)))


def test_kto_training_raises_the_desirable_replies_over_the_undesirable_in_evaluate(tmp_path):
    """lora_ns.evaluate scored KTO's rows as generation: BLEU against undesirable replies too. It now reports
    the mean log-prob per token of each kind; training should widen their gap on the rows it trained on."""
    from lora_ns.evaluate import main as evaluate
    from lora_ns.train import run_training

    run_training(recipe_for("kto", tmp_path / "out", max_steps=12, per_device_train_batch_size=4,
                            learning_rate=1e-2, lr_scheduler_type="constant", max_length=128))
    sample = Path(__file__).parents[1] / "lora_ns/samples/kto.jsonl"
    margins = []
    for which, where in (("--model", "builtin:tiny-llama"), ("--adapter", str(tmp_path / "out"))):
        out = tmp_path / f"eval{len(margins)}"
        assert evaluate([str(tmp_path / "out" / "recipe.yaml"), which, where, "--data-file", str(sample),
                         "--output-dir", str(out), "--no-progress"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["kind"] == "unpaired"
        assert metrics["kto_margin"] == pytest.approx(
            metrics["desirable_logp_per_token"] - metrics["undesirable_logp_per_token"])
        margins.append(metrics["kto_margin"])
    # per-token log-probs are ~ -7 nats on the random base (gap ~0), ~0.5 nat apart after these 12 steps; a
    # gain of 0.25 nat per token is far above fp32 rounding of the means (~1e-5) and CPU-to-CPU drift
    assert margins[1] > margins[0] + 0.25, margins


@pytest.mark.parametrize("template", [None, "Q: {prompt}\nA: "], ids=["chat", "prompt_template"])
def test_evaluation_scores_the_tokens_dpo_trains_on(template, tmp_path):
    """With a system prompt, lora_ns.evaluate's margin feeds the model exactly the ids TRL's DPOTrainer
    tokenized for training (system prompt included) and sums over exactly its chosen and rejected ids (the
    template's trailing space merges into the reply's first token: TRL's prompt/reply split, not ours)."""
    import torch

    from lora_ns.data import formatted_examples
    from lora_ns.setup import setup
    from lora_ns.train import prepare

    recipe = recipe_for("dpo", tmp_path / "out", max_length=512)
    recipe.dataset.system_prompt, recipe.dataset.prompt_template = "Answer like a pirate.", template
    trainer, tokenizer, _ = prepare(recipe, setup(recipe, dry_run=True).args)
    trained = {(tuple(r["prompt_ids"] + r["chosen_ids"]), tuple(r["prompt_ids"] + r["rejected_ids"])):
               (r["chosen_ids"], r["rejected_ids"]) for r in trainer.train_dataset}
    # the same logits at every position: log p(token) is a fixed table, so a margin is a sum over its tokens
    logits = torch.randn(len(tokenizer), generator=torch.Generator().manual_seed(0))
    table, seen = torch.log_softmax(logits, dim=-1), []

    class Recorder:
        device = torch.device("cpu")

        def __call__(self, input_ids):
            seen.append(tuple(input_ids[0].tolist()))
            return SimpleNamespace(logits=logits.expand(1, input_ids.shape[1], -1))

    loaded = SimpleNamespace(model=Recorder(), tokenizer=tokenizer)
    for example in formatted_examples(recipe):
        margin = preference_margin(loaded, example, recipe)
        pair = tuple(seen[-2:])
        assert "Answer like a pirate." in tokenizer.decode(pair[0])
        assert pair in trained, tokenizer.decode(pair[0])
        chosen, rejected = trained[pair]
        # fp32 sums of < 100 terms of |log p| < 15: rounding stays under 1e-4, far below any one term
        assert margin == pytest.approx(float(table[chosen].sum() - table[rejected].sum()), abs=1e-3)


def even_tokens(prompts, completions, completion_ids, **kwargs):
    """Fraction of completion tokens with an even id: half the vocabulary, so every group has a spread."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def reward_without_kwargs(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, answer):
    """A user reward naming every argument GRPOTrainer passes, and no **kwargs."""
    return [float(len(completion_text(c)) > 0) for c in completions]


def reward_missing_log_kwargs(prompts, completions, completion_ids, trainer_state, answer):
    """Without TRL's log_extra / log_metric (added in TRL 1.x): the first step stopped on it."""
    return [0.0 for _ in completions]


def test_a_reward_that_cannot_take_what_grpo_passes_is_refused_and_one_that_can_trains(tmp_path):
    """The signature check binds exactly what GRPOTrainer passes: a reward without log_extra passed validate and
    stopped the first step ("unexpected keyword argument 'log_extra'"); one taking all of them trains."""
    from lora_ns.setup import setup
    from lora_ns.train import run_training

    def recipe(reward: str, out: str):
        return recipe_for("grpo", tmp_path / out, max_steps=1, per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=2, reward_funcs=[f"test_preference:{reward}"])

    with pytest.raises(UserError) as err:
        setup(recipe("reward_missing_log_kwargs", "refused"), dry_run=True)
    assert "unexpected keyword argument 'log_extra'" in str(err.value)
    trainer, _ = run_training(recipe("reward_without_kwargs", "trained"))
    assert trainer.state.global_step == 1


@pytest.mark.parametrize("task, formatter, extra", [("grpo", "prompt_only", {"reward_funcs": ["format"]}),
                                                     ("dpo", "preference", {}), ("kto", "kto", {})])
def test_multi_turn_prompts_through_a_prompt_template_fail_in_validate_at_their_line(tmp_path, task, formatter,
                                                                                    extra):
    """Training renders preference prompts (a list of messages) after formatting: a conversation cannot go
    through a plain-text prompt_template. Validate formatted them only, passed, and training stopped there."""
    from lora_ns.setup import setup

    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    reply = {"dpo": {"chosen": "4", "rejected": "5"}, "kto": {"completion": "4", "label": True}}.get(task, {})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": turns, **reply}) + "\n" for _ in range(4)))
    recipe = recipe_for(task, tmp_path / "out", data=str(data), formatter=formatter, **extra)
    recipe.dataset.prompt_template = "Q: {prompt}\nA: "
    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    first = err.value.problems[0]
    assert (first.file, first.line, first.field) == (str(data), 1, "prompt")
    assert "needs the chat template, which dataset.prompt_template replaces" in first.message


def reward_reads_text(completions, **kwargs):
    """Written for plain-text completions: a chat prompt's completion is a list of messages."""
    return [float(c.strip().endswith("4")) for c in completions]


def reward_one_number(completions, **kwargs):
    return 1.0


def reward_one_short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def reward_words(completions, **kwargs):
    return ["good" for _ in completions]


def test_user_rewards_are_tried_on_sampled_rows_as_grpo_calls_them():
    """What GRPOTrainer stops on at the first step (after the weights load and sample) is found on the rows:
    an exception (a chat completion read as text), a number for the batch, a count or a type that is wrong."""
    from lora_ns.rewards import reward_trial_problems

    chat = [{"prompt": [{"role": "user", "content": f"{i}+2?"}], "answer": "#### 4"} for i in range(3)]
    text = [{"prompt": f"{i}+2?", "answer": "#### 4"} for i in range(3)]
    expected = {"reward_reads_text": "raised AttributeError: 'list' object has no attribute 'strip'",
                "reward_one_number": "returned a float, not one reward per completion",
                "reward_one_short": "returned 2 rewards for 3 completions",
                "reward_words": "returned a str among its rewards"}
    for name, why in expected.items():
        recipe = recipe_for("grpo", reward_funcs=["gsm8k", f"test_preference:{name}"])
        (problem,) = reward_trial_problems(recipe, chat, dry_run=False)
        assert problem.field == "training.reward_funcs" and problem.is_error
        assert problem.message.startswith(f"reward 'test_preference:{name}' {why}, called on 3 sampled rows")
        assert reward_trial_problems(recipe, chat)[0].severity == "warning"  # validating: maybe another machine
    assert reward_trial_problems(recipe_for("grpo", reward_funcs=["test_preference:reward_reads_text"]), text) == []
    fine = recipe_for("grpo", reward_funcs=["test_preference:reward_without_kwargs", "format"])
    assert reward_trial_problems(fine, chat, dry_run=False) == []


def test_a_reward_that_fails_on_the_data_warns_in_validate_and_stops_train_before_loading(tmp_path):
    from lora_ns.setup import setup
    from lora_ns.train import run_training

    recipe = recipe_for("grpo", tmp_path / "out", max_steps=1, reward_funcs=["test_preference:reward_one_number"])
    (note,) = [p for p in setup(recipe, dry_run=True).notes if p.field == "training.reward_funcs"]
    assert note.severity == "warning" and "returned a float" in note.message
    with pytest.raises(UserError, match="returned a float"):
        run_training(recipe)
    assert not (tmp_path / "out").exists()


def test_grpo_raises_the_mean_reward(tmp_path):
    """A full fine-tune: on a random model, "more even ids" is learned through the output rows of the
    sampled tokens, which LoRA on all-linear (lm_head excluded) does not train; one-token-ish completions
    give each token its own reward, so a few steps suffice."""
    from lora_ns.train import run_training

    recipe = recipe_for("grpo", tmp_path / "out", peft={"method": "full"}, max_steps=10,
                        per_device_train_batch_size=16, num_generations=8, max_completion_length=2,
                        learning_rate=5e-2, lr_scheduler_type="constant",
                        reward_funcs=["test_preference:even_tokens"])
    trainer, _ = run_training(recipe)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    assert len(rewards) == 10
    # Each step's mean is over 32 tokens of p = 0.5 at the start: standard error 0.09 per step, 0.05 over
    # three steps. A rise of 0.25 (first three steps -> last three) is five standard errors.
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last - first > 0.25, rewards


def test_grpo_batches_are_checked_for_the_launchs_processes(tmp_path):
    """TRL sizes GRPO's generation batch by the processes: validate, one process, refused a recipe right for
    two and passed one that every rank of a larger launch refused. It counts the launch's now."""
    from lora_ns.setup import Checks, setup

    grpo = dict(reward_funcs=["gsm8k"], max_completion_length=8, per_device_train_batch_size=2)
    four = recipe_for("grpo", tmp_path / "a", num_generations=4, **grpo)  # 2 x 2 processes = 4 per step
    problem = the_setup_error(four)
    assert problem.field == "training.num_generations" and "x processes" in problem.fix, problem
    assert setup(four, dry_run=True, checks=Checks(processes=2)).args.generation_batch_size == 4
    two = recipe_for("grpo", tmp_path / "b", num_generations=2, generation_batch_size=2, **grpo)
    setup(two, dry_run=True)
    with pytest.raises(UserError, match="training.generation_batch_size") as err:
        setup(two, dry_run=True, checks=Checks(processes=2))  # 2 rows cannot make 2 processes' batches of 2
    assert "x processes" in str(err.value)


def test_grpo_samples_a_prompt_tuned_model_uncached(tmp_path):
    """peft's cached generation steps misplace prompt tuning's virtual tokens (lora_ns.inference.generate):
    GRPO would learn from samples of a slightly different model, so it samples uncached, as training scores."""
    from lora_ns.setup import setup
    from lora_ns.train import prepare

    recipe = recipe_for("grpo", tmp_path / "out", reward_funcs=["gsm8k"], num_generations=2,
                        per_device_train_batch_size=2, max_completion_length=8,
                        peft={"method": "prompt_tuning", "num_virtual_tokens": 4})
    trainer, _, _ = prepare(recipe, setup(recipe, dry_run=True).args)
    assert trainer.generation_config.use_cache is False
    # generation_kwargs of the recipe's own replaced ours whole: cached again
    recipe.training["generation_kwargs"] = {"top_k": 5}
    assert setup(recipe, dry_run=True).args.generation_kwargs == {"use_cache": False, "top_k": 5}
    lora = recipe_for("grpo", tmp_path / "out2", reward_funcs=["gsm8k"])
    assert setup(lora, dry_run=True).args.generation_kwargs is None  # others keep the cache (faster)
