"""Preference and RL tasks on TRL: ``task: dpo | orpo | kto | grpo``.

``training:`` passes through to the task's TRL config class (`TASKS`), whose own ``__post_init__`` checks run.
An adapter needs no second model: TRL scores the reference with the adapter disabled (dpo, kto); a full
fine-tune gets a frozen copy of the starting model. GRPO's rewards are `lora_ns.rewards`.
"""

from __future__ import annotations

import importlib
import re
import warnings
from typing import Any

from lora_ns.config import Recipe
from lora_ns.data.formatters import FORMATTERS
from lora_ns.errors import Problem, first_line, suggest
from lora_ns.rewards import resolve_rewards

# task -> (TRL config class, TRL trainer class, the formatter kind it reads, what those rows must give)
TASKS: dict[str, tuple[str, str, str, str]] = {
    "dpo": ("trl:DPOConfig", "trl:DPOTrainer", "preference", "prompt/chosen/rejected"),
    "orpo": ("trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer", "preference",
             "prompt/chosen/rejected"),
    "kto": ("trl:KTOConfig", "trl:KTOTrainer", "unpaired", "prompt/completion/label"),
    "grpo": ("trl:GRPOConfig", "trl:GRPOTrainer", "prompt_only", "prompt (and the reference answer)"),
}
PREFERENCE_TASKS = tuple(TASKS)


def _load(where: str) -> Any:
    module, _, name = where.partition(":")
    with warnings.catch_warnings():  # TRL's notice on importing ORPO: the README and its recipe say it once
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        return getattr(importlib.import_module(module), name)


def config_class(task: str) -> type:
    return _load(TASKS[task][0])


def preference_trainer(recipe: Recipe, model, **kwargs):
    """The task's TRL trainer on an already peft-wrapped (or full) model."""
    from peft import PeftModel

    if recipe.task == "grpo":  # setup's rules have already refused a name that does not resolve
        kwargs["reward_funcs"] = resolve_rewards(recipe.training.get("reward_funcs"))[0]
    if recipe.task in ("dpo", "kto") and not isinstance(model, PeftModel):  # the loss needs a reference
        import copy

        kwargs["ref_model"] = copy.deepcopy(model).eval()  # a full fine-tune: freeze the starting weights
    return _load(TASKS[recipe.task][1])(model=model, **kwargs)


def try_prompt_templates(tokenizer, rows) -> None:
    """GRPO renders its chat prompts as it samples, mid-run: render one prompt of each role sequence in the
    whole data now (templates refuse by roles: a system turn, turns out of order), so that a refusal comes
    before the weights load; jinja's TemplateError is train's to word. A stream is left to the sampling."""
    import datasets

    if not isinstance(rows, datasets.Dataset) or not tokenizer.chat_template:
        return
    seen: set[tuple[str, ...]] = set()
    for prompt in rows["prompt"]:
        if isinstance(prompt, list) and (roles := tuple(m["role"] for m in prompt)) not in seen:
            seen.add(roles)
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


# --- validate: what TRL does not check -------------------------------------------------------------

def check_preference_recipe(recipe: Recipe) -> list[Problem]:
    """Cross-field checks for dpo/orpo/kto/grpo recipes: formatter kind, beta, num_generations, lengths."""
    if recipe.task not in TASKS:
        return []
    problems, (_, _, kind, columns) = [], TASKS[recipe.task]
    name, grpo = recipe.dataset.formatter, recipe.task == "grpo"
    if (fmt := FORMATTERS.get(name)) is not None and fmt.kind != kind:
        fits = ", ".join(sorted(n for n, f in FORMATTERS.items() if f.kind == kind))
        problems.append(recipe.problem("dataset.formatter", f"task {recipe.task} needs {columns} rows; "
                                       f"formatter '{name}' gives {fmt.kind} rows", f"use one of: {fits}"))
    t = recipe.training  # numbers already: lora_ns.config converts each value to its field's type
    if (beta := t.get("beta")) is not None and not (0 <= beta <= 10 and (grpo or beta > 0)):
        what = "0 (no KL term) to 10" if grpo else "above 0, at most 10"
        problems.append(recipe.problem("training.beta", f"{beta} is out of range ({what})",
                                       "typical: dpo/kto 0.1, orpo 0.1, grpo 0.0-0.04"))
    total, completion = t.get("max_length", 1024), t.get("max_completion_length")  # 1024: TRL's default
    if recipe.task == "orpo" and total and completion and completion >= total:  # ORPO truncates the pair
        problems.append(recipe.problem("training.max_completion_length", f"{completion} is not below "
                                       f"max_length={total}, leaving no room for the prompt",
                                       "lower max_completion_length or raise max_length"))
    if grpo and (n := t.get("num_generations")) is not None and n < 2:  # TRL's message names no field
        problems.append(recipe.problem("training.num_generations", f"is {n}; GRPO compares completions "
                                       "of the same prompt", "set it to 2 or more"))
    if t.get("sync_ref_model") and recipe.peft.method != "full":  # TRL refuses it when the trainer starts
        problems.append(recipe.problem("training.sync_ref_model", "with a peft adapter the reference is the "
                                       "base model with the adapter off: there is no copy to sync",
                                       "set sync_ref_model: false, or peft.method: full"))
    elif t.get("sync_ref_model") and grpo and not t.get("beta"):  # GRPO's beta defaults to 0: no reference
        problems.append(recipe.problem("training.sync_ref_model", "with beta 0 GRPO keeps no reference "
                                       "model to sync", "set training.beta above 0 (e.g. 0.04), or remove "
                                       "sync_ref_model"))
    for name in ("desirable_weight", "undesirable_weight", "epsilon", "epsilon_high"):  # TRL takes any number
        if (value := t.get(name)) is not None and value <= 0:
            problems.append(recipe.problem(f"training.{name}", f"{value} must be above 0 (a loss weight or a "
                                           "clipping range)", f"remove training.{name} for TRL's default"))
    if grpo and completion is not None and completion < 1:
        problems.append(recipe.problem("training.max_completion_length", "must be at least 1", "e.g. 256"))
    wanted = t.get("loss_type")
    wanted = [wanted] if isinstance(wanted, str) else wanted or []
    if recipe.task == "kto" and "apo_zero_unpaired" not in wanted:  # TRL refuses them as the trainer starts
        problems += _kto_kl_problems(recipe)
    if recipe.task == "dpo":
        problems += _dpo_loss_problems(recipe, wanted)
    if t.get("precompute_ref_log_probs") and recipe.dataset.streaming:  # the trainers refuse it at the start
        problems.append(recipe.problem("training.precompute_ref_log_probs", "needs the whole data set "
                                       "first, and dataset.streaming reads it as training goes",
                                       "set one of them false"))
    if recipe.task == "orpo" and recipe.dataset.streaming:  # TRL's experimental ORPO maps with num_proc
        problems.append(recipe.problem("dataset.streaming", "ORPO (trl.experimental) cannot read a stream: "
                                       "it prepares the whole data set as it starts",
                                       "set dataset.streaming: false"))
    if not grpo and t.get("train_sampling_strategy") == "group_by_length":  # its sampler fails at the start
        problems.append(recipe.problem("training.train_sampling_strategy", f"{recipe.task} rows carry prompt "
                                       "and reply ids, not the input_ids length grouping measures",
                                       "remove training.train_sampling_strategy"))
    known = loss_types(recipe.task) if wanted else []
    for loss in [w for w in wanted if known and w not in known]:  # the trainers check it at the first step
        problems.append(recipe.problem("training.loss_type", f"unknown {recipe.task} loss '{loss}'",
                                       suggest(loss, known)))
    if grpo and t.get("remove_unused_columns"):  # lora_ns sets it false: the first step's rewards lack them
        problems.append(recipe.problem("training.remove_unused_columns", "drops the data columns GRPO's "
                                       "rewards are called with (the reference answer)",
                                       "remove it (lora_ns sets it false for GRPO)"))
    if grpo and (share := t.get("top_entropy_quantile")) is not None and not 0 <= share <= 1:  # step 1
        problems.append(recipe.problem("training.top_entropy_quantile", f"{share} is not a share of tokens "
                                       "in [0, 1]", "use 0.2 (the paper's) or 1.0 (TRL's default: all)"))
    if grpo and (greedy := [k for k, v in (("top_p", 0), ("top_k", 1)) if t.get(k) == v]):
        problems.append(recipe.problem(f"training.{greedy[0]}", f"{greedy[0]} {t[greedy[0]]} keeps only the "
                                       "likeliest token: every completion of a prompt is the same, so each "
                                       "advantage is 0 and GRPO learns nothing",
                                       "use top_p 0.9-1.0, top_k 0 (off)"))
    if grpo and (temperature := t.get("temperature")) is not None and temperature <= 0:  # generation: step 1
        problems.append(recipe.problem("training.temperature", f"{temperature} must be above 0 (GRPO samples "
                                       "its completions)", "use e.g. 1.0 (TRL's default) or 0.7"))
    weights, funcs = t.get("reward_weights"), t.get("reward_funcs") or []
    if grpo and weights is not None and len(weights) != len(funcs):  # GRPOTrainer: after the weights load
        problems.append(recipe.problem("training.reward_weights", f"{len(weights)} weight(s) for "
                                       f"{len(funcs)} reward function(s)", "give one weight per reward_funcs "
                                       "entry, in the same order (or leave reward_weights out: all 1.0)"))
    problems += [recipe.problem(f"training.{name}", f"got '{t[name]}'", suggest(str(t[name]), values))
                 for name, values in TRL_VALUES.items()
                 if isinstance(t.get(name), str) and t[name] not in values]
    reasons = resolve_rewards(recipe.training.get("reward_funcs"))[1] if grpo else []
    return problems + (sampling_problems(recipe) if grpo else []) + [
        recipe.problem("training.reward_funcs", why, "fix the name or the function") for why in reasons]


# TRL 1.16 branches on these strings when the loss is computed, after the weights load; its configs list no
# choices (lora_ns.validate.arguments checks fields that do)
TRL_VALUES = {"f_divergence_type": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
              "scale_rewards": ("group", "batch", "none"), "importance_sampling_level": ("token", "sequence"),
              "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
              "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate",
                                                "sequence_mask")}


def _dpo_loss_problems(recipe: Recipe, losses: list[str]) -> list[Problem]:
    """Loss settings DPOTrainer refuses as it starts (or at the first step)."""
    problems, t = [], recipe.training
    if t.get("use_weighting") and (sorting := sorted({"aot", "aot_unpaired"} & set(losses))):
        problems.append(recipe.problem("training.use_weighting", f"WPO weighting with loss '{sorting[0]}', "
                                       "which sorts the rows apart from their weights", "set use_weighting: "
                                       "false, or use another loss_type"))
    if "exo_pair" in losses and not t.get("label_smoothing"):
        problems.append(recipe.problem("training.label_smoothing", "loss 'exo_pair' needs label_smoothing "
                                       "above 0", "set training.label_smoothing: 0.001 (the EXO paper's)"))
    return problems


def _kto_kl_problems(recipe: Recipe) -> list[Problem]:
    """KTO's KL term pairs each prompt with its neighbour's completion in the same device batch, in order."""
    problems, t, other = [], recipe.training, "or loss_type: apo_zero_unpaired (no KL term)"
    if (batch := t.get("per_device_train_batch_size", 8)) <= 1:
        problems.append(recipe.problem("training.per_device_train_batch_size", f"{batch}: KTO estimates its "
                                       "KL term from the other rows of a device batch",
                                       f"set it to 2 or more, {other}"))
    if (strategy := t.get("train_sampling_strategy", "sequential")) != "sequential":
        problems.append(recipe.problem("training.train_sampling_strategy", f"'{strategy}' breaks the "
                                       "neighbouring rows KTO's KL term is estimated from",
                                       f"remove it (KTO samples in order), {other}"))
    return problems


def sampling_problems(recipe: Recipe) -> list[Problem]:
    """GRPO's sampling settings that transformers' own logits processors refuse at the first generation:
    built here with the recipe's values (generate uses one only when it changes anything)."""
    from transformers import generation

    inactive = {"top_k": (0, None), "top_p": (1.0, None), "min_p": (None,), "repetition_penalty": (1.0, None)}
    build = {"top_k": generation.TopKLogitsWarper, "top_p": generation.TopPLogitsWarper,
             "min_p": generation.MinPLogitsWarper,
             "repetition_penalty": generation.RepetitionPenaltyLogitsProcessor}
    problems = []
    for name, make in build.items():
        if (value := recipe.training.get(name)) not in inactive[name]:
            try:
                make(value)
            except ValueError as err:
                problems.append(recipe.problem(f"training.{name}", first_line(err), f"fix training.{name}"))
    return problems


def loss_types(task: str) -> list[str]:
    """The loss names the task's TRL config gives for loss_type: its `choices`, or the values its help lists
    ("Possible values are: ..." up to the sentence's end); [] when it names none (then nothing is checked)."""
    field = config_class(task).__dataclass_fields__.get("loss_type")
    if field is None:
        return []
    if choices := field.metadata.get("choices"):
        return list(choices)
    listed = re.search(r"values are:?\s*(.*?)\.(?:\s|$)", field.metadata.get("help", ""), re.S)
    return re.findall(r"'(\w+)'", listed.group(1)) if listed else []
