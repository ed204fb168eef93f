"""Preference and RL tasks on TRL: ``task: dpo | orpo | kto | grpo``.

Same model/quantization/peft sections as SFT; ``training:`` passes through to the task's own TRL
config class (`TASKS`), so the names are TRL's (``beta``, ``max_length``, ``num_generations``, ...).
lora_ns adds ``training.reward_funcs`` for grpo (`lora_ns.rewards`).

Defaults:
- No second model when an adapter is trained: TRL keeps a frozen copy of the starting adapter
  (``ref``, saved beside the trained one) in the same model and scores the reference with it (dpo,
  kto). A full fine-tune gets a frozen copy of the starting model. ORPO needs no reference; GRPO
  none at TRL's default ``beta: 0``.
- The data comes through the preference formatters (`lora_ns.data.preference`), rendered in TRL's
  conversational format when the tokenizer has a chat template.

`check_preference_recipe(recipe)` holds the cross-field checks `validate` runs for these tasks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError


@dataclass(frozen=True)
class TaskSpec:
    config: tuple[str, str]  # (module, class) of the TRL config dataclass
    trainer: tuple[str, str]
    kind: str  # the formatter kind the task reads (lora_ns.data.preference)
    reference: bool  # the loss compares against a reference model
    columns: str  # for messages: what the rows must give


TASKS: dict[str, TaskSpec] = {
    "dpo": TaskSpec(("trl.trainer.dpo_config", "DPOConfig"), ("trl", "DPOTrainer"), "preference", True,
                    "prompt/chosen/rejected"),
    "orpo": TaskSpec(("trl.experimental.orpo.orpo_config", "ORPOConfig"), ("trl.experimental.orpo", "ORPOTrainer"),
                     "preference", False, "prompt/chosen/rejected"),
    "kto": TaskSpec(("trl.trainer.kto_config", "KTOConfig"), ("trl", "KTOTrainer"), "unpaired", True,
                    "prompt/completion/label"),
    "grpo": TaskSpec(("trl.trainer.grpo_config", "GRPOConfig"), ("trl", "GRPOTrainer"), "prompt_only", False,
                     "prompt (and the reference answer)"),
}
PREFERENCE_TASKS = tuple(TASKS)


def _load(where: tuple[str, str]) -> Any:
    return getattr(importlib.import_module(where[0]), where[1])


def config_class(task: str) -> type:
    return _load(TASKS[task].config)


def training_defaults(recipe: Recipe) -> dict[str, Any]:
    """Settings these tasks need beside lora_ns' general defaults (the recipe's own keys still win)."""
    if recipe.task == "grpo":
        return {"remove_unused_columns": False}  # the reward functions read the reference column
    return {}


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def build_trainer(recipe: Recipe, args, model, tokenizer, train_dataset, eval_dataset, callbacks):
    """The task's TRL trainer on an already peft-wrapped (or full) model."""
    spec = TASKS[recipe.task]
    kwargs: dict[str, Any] = dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=tokenizer, callbacks=callbacks)
    if recipe.task == "grpo":
        from lora_ns.rewards import reward_problems, resolve_rewards

        if problems := reward_problems(recipe):
            raise UserError(problems)
        kwargs["reward_funcs"] = resolve_rewards(recipe.training.get("reward_funcs"))[0]
    if spec.reference and not _is_peft(model):
        import copy

        kwargs["ref_model"] = copy.deepcopy(model).eval()  # a full fine-tune: freeze the starting weights
    return _load(spec.trainer)(**kwargs)


# --- validate ---------------------------------------------------------------------------------------

def _number(recipe: Recipe, key: str, default: float | None) -> float | None:
    value = recipe.training.get(key, default)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None  # the type check in lora_ns.config reports it


def _formatter_problems(recipe: Recipe) -> list[Problem]:
    from lora_ns.data.formatters import FORMATTERS

    spec, name = TASKS[recipe.task], recipe.dataset.formatter
    fmt = FORMATTERS.get(name)
    if fmt is None or fmt.kind == spec.kind:
        return []
    fits = sorted(n for n, f in FORMATTERS.items() if f.kind == spec.kind)
    return [recipe.problem("dataset.formatter", f"task {recipe.task} needs {spec.columns} rows; formatter "
                           f"'{name}' gives {fmt.kind} rows", f"use one of: {', '.join(fits)}")]


def _beta_problems(recipe: Recipe) -> list[Problem]:
    beta = _number(recipe, "beta", None)
    if beta is None:
        return []
    low_ok = beta >= 0 if recipe.task == "grpo" else beta > 0
    if not low_ok or beta > 10:
        what = "0 (no KL term) to 10" if recipe.task == "grpo" else "above 0, at most 10"
        return [recipe.problem("training.beta", f"{beta} is out of range ({what})",
                               "typical: dpo/kto 0.1, orpo 0.1, grpo 0.0-0.04")]
    return []


def _grpo_problems(recipe: Recipe) -> list[Problem]:
    from lora_ns.rewards import reward_problems

    problems = reward_problems(recipe)
    t = recipe.training
    n = int(_number(recipe, "num_generations", 8) or 0)
    if n < 2:
        problems.append(recipe.problem("training.num_generations", f"is {n}; GRPO compares completions "
                                       "of the same prompt", "set it to 2 or more"))
        return problems
    batch = int(_number(recipe, "per_device_train_batch_size", 8) or 1)
    steps = int(_number(recipe, "steps_per_generation", None) or _number(recipe, "gradient_accumulation_steps", 1))
    generation_batch = int(_number(recipe, "generation_batch_size", None) or batch * steps)
    if generation_batch % n:
        problems.append(recipe.problem(
            "training.num_generations", f"{n} does not divide the generation batch ({generation_batch} completions)",
            "make per_device_train_batch_size (or generation_batch_size) a multiple of num_generations"))
    completion = _number(recipe, "max_completion_length", 256)
    limit = _number(recipe, "vllm_max_model_length", None) if t.get("use_vllm") else None
    if completion is not None and completion < 1:
        problems.append(recipe.problem("training.max_completion_length", "must be at least 1", "e.g. 256"))
    elif limit is not None and completion is not None and completion >= limit:
        problems.append(recipe.problem("training.max_completion_length", f"{int(completion)} leaves no room "
                                       f"for the prompt in vllm_max_model_length={int(limit)}",
                                       "lower it or raise vllm_max_model_length"))
    return problems


def _length_problems(recipe: Recipe) -> list[Problem]:
    """ORPO truncates prompt + completion to max_length: the completion share must leave room for a prompt."""
    total = _number(recipe, "max_length", 1024)
    completion = _number(recipe, "max_completion_length", None)
    if recipe.task == "orpo" and total and completion and completion >= total:
        return [recipe.problem("training.max_completion_length", f"{int(completion)} is not below "
                               f"max_length={int(total)}, leaving no room for the prompt",
                               "lower max_completion_length or raise max_length")]
    if total is not None and total < 8:
        return [recipe.problem("training.max_length", f"{int(total)} tokens cannot hold a prompt and a reply",
                               "e.g. 1024")]
    return []


def check_preference_recipe(recipe: Recipe) -> list[Problem]:
    """Cross-field checks for dpo/orpo/kto/grpo recipes (formatter kind, beta, generation sizes, lengths)."""
    if recipe.task not in TASKS:
        return []
    problems = _formatter_problems(recipe) + _beta_problems(recipe) + _length_problems(recipe)
    return problems + (_grpo_problems(recipe) if recipe.task == "grpo" else [])
