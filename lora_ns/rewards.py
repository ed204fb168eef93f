"""GRPO reward functions, named in a recipe's ``training.reward_funcs``.

A name is a builtin below (``gsm8k``, ``format``) or a dotted path ``package.module:function`` to the
user's own. Every reward has TRL's signature: ``fn(prompts, completions, **kwargs) -> list[float]``,
where ``completions`` are strings (or, for chat prompts, ``[{"role": "assistant", "content": ...}]``
lists) and ``kwargs`` holds the dataset's other columns (here ``answer``, the reference) plus
``completion_ids`` and ``trainer_state``. `resolve_rewards` checks every name before training starts
(importable, callable, accepts that signature), so a typo costs seconds, not a GPU hour.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

from lora_ns.answers import canonical_number, same_answer
from lora_ns.errors import Problem

RewardFunc = Callable[..., list[float]]
# What TRL's GRPOTrainer passes to every reward function (besides the dataset's columns).
TRL_REWARD_KWARGS = ("prompts", "completions", "completion_ids", "trainer_state")
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


def _import(name: str) -> RewardFunc:
    """``pkg.mod:fn`` -> the function; raises ValueError with a one-line reason."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"unknown reward '{name}'; use {', '.join(BUILTIN_REWARDS)} or package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing at import
        raise ValueError(f"cannot import '{module_name}' ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"module '{module_name}' has no '{attr}'")
    return fn


def check_signature(fn: Any, columns: tuple[str, ...] = ()) -> str | None:
    """Why `fn` cannot be called the way GRPOTrainer calls rewards, or None."""
    if not callable(fn):
        return f"is a {type(fn).__name__}, not a function"
    try:
        inspect.signature(fn).bind(**{k: None for k in (*TRL_REWARD_KWARGS, *columns)})
    except TypeError as err:
        return f"cannot take TRL's reward arguments ({err}); define it as fn(prompts, completions, **kwargs)"
    except ValueError:  # builtins without a signature: let TRL try
        return None
    return None


def resolve_rewards(names: Any, columns: tuple[str, ...] = ("answer",)) -> tuple[list[RewardFunc], list[str]]:
    """(reward functions, one-line reasons for each name that cannot be used)."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not names:
        return [], ["needs at least one reward, e.g. [gsm8k, format] or [mypkg.rewards:length_penalty]"]
    funcs, reasons = [], []
    for name in names:
        try:
            fn = BUILTIN_REWARDS.get(name) or _import(str(name))
        except ValueError as err:
            reasons.append(str(err))
            continue
        why = check_signature(fn, columns)
        if why:
            reasons.append(f"'{name}' {why}")
        funcs.append(fn)
    return funcs, reasons


def reward_problems(recipe) -> list[Problem]:
    """`resolve_rewards` as recipe problems on ``training.reward_funcs``."""
    _, reasons = resolve_rewards(recipe.training.get("reward_funcs"))
    return [recipe.problem("training.reward_funcs", why, "fix the name or the function") for why in reasons]
