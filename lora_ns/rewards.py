"""GRPO's rewards (``training.reward_funcs``): the builtins (``gsm8k``, ``format``), a user's
``package.module:function`` resolved and checked against the call GRPOTrainer makes (its signature, then a
trial on a few sampled rows), so a typo or a reward that breaks on the data's shape costs seconds, not a GPU
hour.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

from lora_ns.answers import canonical_number, extract_answer, same_answer
from lora_ns.config import Recipe
from lora_ns.errors import Problem, first_line

RewardFunc = Callable[..., list[float]]
# what GRPOTrainer._calculate_rewards passes beside the data columns (tests/test_preference.py trains with a
# reward taking exactly these: a name TRL adds fails there)
TRL_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
REWARD_TRIAL_ROWS = 4  # rows each user reward is tried on before training
_ANSWER_LINE = re.compile(r"^\s*####\s*(\S+)\s*$", re.MULTILINE)


def completion_text(completion: Any) -> str:
    """The text of one completion, plain or conversational."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def gsm8k_exact_match(completions: list, answer: list[str | None], **kwargs: Any) -> list[float]:
    """1.0 when the completion's final number equals the reference answer's (`lora_ns.answers`), else 0.0."""
    return [float(same_answer(completion_text(c), ref)) for c, ref in zip(completions, answer)]


def answer_format(completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion has a GSM8K answer line (``#### <number>``), else 0.0."""
    def ok(text: str) -> bool:
        return any(canonical_number(m.group(1)) is not None for m in _ANSWER_LINE.finditer(text))
    return [float(ok(completion_text(c))) for c in completions]


BUILTIN_REWARDS: dict[str, RewardFunc] = {"gsm8k": gsm8k_exact_match, "format": answer_format}


def _reward(name: str, columns: tuple[str, ...]) -> RewardFunc:
    """A builtin or ``pkg.mod:fn``, checked against the call GRPOTrainer makes; ValueError with why not."""
    module_name, _, attr = name.partition(":")
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if not module_name or not attr:
        raise ValueError(f"unknown reward '{name}'; use {', '.join(BUILTIN_REWARDS)} or "
                         "package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing at import
        why = f"{type(err).__name__}: {first_line(err)}"
        raise ValueError(f"cannot import '{module_name}' ({why})")
    if (fn := getattr(module, attr, None)) is None:
        raise ValueError(f"module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise ValueError(f"'{name}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind(**{k: None for k in (*TRL_REWARD_KWARGS, *columns)})
    except TypeError as err:
        raise ValueError(f"'{name}' cannot take TRL's reward arguments ({err}); define it as "
                         "fn(prompts, completions, **kwargs)")
    except ValueError:  # builtins without a signature: let TRL try
        pass
    return fn


def resolve_rewards(names: Any, columns: tuple[str, ...] = ("answer",)) -> tuple[list[RewardFunc], list[str]]:
    """(reward functions, one-line reasons for each name that cannot be used)."""
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names:
        return [], ["needs at least one reward, e.g. [gsm8k, format] or [mypkg.rewards:length_penalty]"]
    funcs, reasons = [], []
    for name in names:
        try:
            funcs.append(_reward(str(name), columns))
        except ValueError as err:
            reasons.append(str(err))
    return funcs, reasons


def reference_problems(recipe: Recipe, answers: list[str | None]) -> list[Problem]:
    """Rewards that score against the row's reference (a required `answer` parameter, as the builtin gsm8k
    has) given sampled rows without one (or, for gsm8k, without a number in it): those rows always score 0,
    and with none scored GRPO has no signal to learn from. `answers`: the sampled rows' formatted answers."""
    problems = []
    for name in recipe.training.get("reward_funcs") or []:
        try:
            fn = _reward(str(name), ("answer",))
            wanted = inspect.signature(fn).parameters.get("answer")
        except (ValueError, TypeError):  # reported by check_preference_recipe
            continue
        if wanted is None or wanted.default is not inspect.Parameter.empty:
            continue
        number = fn is gsm8k_exact_match  # it compares final numbers (lora_ns.answers)
        scored = sum(bool(a and (not number or extract_answer(a) is not None)) for a in answers)
        if scored < len(answers):
            what, none = "no number in their answer" if number else "no answer", scored == 0
            fix = "map the reference with dataset.columns.answer" if none else "fill those in or drop them"
            problems.append(recipe.problem(
                "training.reward_funcs", f"reward '{name}' scores completions against the row's answer; "
                f"{len(answers) - scored} of {len(answers)} sampled rows have {what}, so they score 0",
                fix, "error" if none else "warning"))
    return problems


def reward_trial_problems(recipe: Recipe, rows: list[dict[str, Any]], dry_run: bool = True) -> list[Problem]:
    """Each user reward called on a few sampled rows as GRPOTrainer calls it, each row's reference answer as
    its completion: a reward that breaks on the data's shape (a chat completion, a list of messages, read as
    text; a column it lacks; one number returned for the batch) fails here, not at the first step, after the
    weights have loaded and sampled. An error when training; a warning when validating (a judge may need a
    service only the training machine reaches)."""
    from transformers import TrainerState

    rows, problems = rows[:REWARD_TRIAL_ROWS], []
    texts = [row["answer"] if isinstance(row.get("answer"), str) else "" for row in rows]
    completions = [[{"role": "assistant", "content": text}] if isinstance(row["prompt"], list) else text
                   for row, text in zip(rows, texts)]
    columns = {key: [row.get(key) for row in rows] for key in (rows[0] if rows else {}) if key != "prompt"}
    for name in [n for n in recipe.training.get("reward_funcs") or [] if str(n) not in BUILTIN_REWARDS]:
        try:
            fn = _reward(str(name), tuple(columns))
        except ValueError:  # reported by check_preference_recipe
            continue
        if inspect.iscoroutinefunction(fn):
            continue
        try:
            rewards = fn(prompts=[row["prompt"] for row in rows], completions=completions,
                         completion_ids=[[] for _ in rows], trainer_state=TrainerState(),
                         log_extra=lambda *_, **__: None, log_metric=lambda *_, **__: None, **columns)
            why = _reward_shape_problem(rewards, len(rows))
        except Exception as err:  # the user's code: anything
            why = f"raised {type(err).__name__}: {first_line(err)}"
        if why:
            problems.append(recipe.problem(
                "training.reward_funcs", f"reward '{name}' {why}, called on {len(rows)} sampled rows as "
                "GRPOTrainer calls it", "completions are text, or [{'role': 'assistant', 'content': ...}] "
                "for chat prompts; return one float (or None) per completion",
                "warning" if dry_run else "error"))
    return problems


def _reward_shape_problem(rewards: Any, count: int) -> str | None:
    """What GRPOTrainer would stop on in a reward function's result, or None."""
    if isinstance(rewards, (str, bytes)) or not hasattr(rewards, "__len__"):
        return f"returned a {type(rewards).__name__}, not one reward per completion"
    if len(rewards) != count:
        return f"returned {len(rewards)} rewards for {count} completions"
    odd = next((r for r in rewards if r is not None and not hasattr(r, "__float__")), None)
    return None if odd is None else f"returned a {type(odd).__name__} among its rewards"
