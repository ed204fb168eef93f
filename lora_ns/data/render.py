"""Render canonical examples into the rows TRL's trainers take, and say which loss masks they need.

prompt/completion and the preference kinds go out *conversational* (TRL applies the chat template, and
trains on the completion only) when the tokenizer has a chat template and the recipe sets no
``dataset.prompt_template``; otherwise as plain text through the prompt template. Chat messages train on
every assistant turn (``assistant_only_loss``); text and pair rows pass through unchanged.
"""

from __future__ import annotations

import string
from typing import Any

from lora_ns.config import Recipe
from lora_ns.data.formatters import FORMATTERS, RowError
from lora_ns.errors import UserError

DEFAULT_PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
TEMPLATE_FIELDS = ("prompt", "system")
TEMPLATE_EXAMPLE = "e.g. \"### Question:\\n{prompt}\\n### Answer:\\n\""


def template_problem(template: str) -> str | None:
    """Why a ``dataset.prompt_template`` cannot be used, or None."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as err:
        return f"not a valid format string ({err}); write literal braces as {{{{ and }}}}"
    allowed = ", ".join("{" + n + "}" for n in TEMPLATE_FIELDS)
    for name, spec, conv in fields:  # plain names only: {prompt.__class__} would print Python internals
        if conv or "{" in (spec or "") or not name.isidentifier():
            shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            return f"placeholder {shown} is not a plain name; use only {allowed}"
    names = [name for name, _, _ in fields]
    if unknown := sorted(set(names) - set(TEMPLATE_FIELDS)):
        shown = ", ".join("{" + n + "}" for n in unknown)
        return f"unknown placeholder(s) {shown}; use {{prompt}} (and {{system}})"
    if "prompt" not in names:
        return "has no {prompt} placeholder, so the question would never reach the model"
    return None


def uses_chat_template(recipe: Recipe, tokenizer) -> bool:
    """Prompt/completion rows go out as chat messages: a chat template and no explicit prompt_template."""
    return recipe.dataset.prompt_template is None and bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(recipe: Recipe, tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(recipe.problem(
            "dataset.formatter", f"formatter '{recipe.dataset.formatter}' gives chat messages but the "
            "tokenizer has no chat template",
            "set model.chat_template (a Jinja template or a file), or use a chat model"))


def _with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + messages
    return messages


def split_last_reply(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """(the conversation before its last assistant turn, that turn's text); (all of it, None) without one.
    What generation starts from and what it is compared against (evaluate, infer, preference pairs)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    return (list(messages), None) if last is None else (list(messages[:last]), messages[last]["content"])


def render(example: dict[str, Any], recipe: Recipe, tokenizer=None) -> dict[str, Any]:
    """One canonical example -> one row for TRL's trainers (pairs and text pass through unchanged)."""
    system = recipe.dataset.system_prompt
    if "messages" in example:
        return {"messages": _with_system(list(example["messages"]), system)}
    if "prompt" not in example:
        return dict(example)
    prompt, replies = example["prompt"], [k for k in ("completion", "chosen", "rejected") if k in example]
    if uses_chat_template(recipe, tokenizer):
        turns = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return {**example, "prompt": _with_system(turns, system),
                **{k: [{"role": "assistant", "content": example[k]}] for k in replies}}
    if isinstance(prompt, list):  # preference kinds: a message list, plain text only for one user turn
        if len(prompt) != 1 or prompt[0]["role"] != "user":
            require_chat_template(recipe, tokenizer)
            raise RowError("prompt", "a multi-turn prompt needs the chat template, which "
                           "dataset.prompt_template replaces", "unset dataset.prompt_template")
        prompt = prompt[0]["content"]
    template = recipe.dataset.prompt_template or DEFAULT_PROMPT_TEMPLATE  # plain text: the prompt template
    text = template.format(prompt=prompt, system=system or "")
    return {**example, "prompt": f"{system}\n\n{text}" if system and "{system}" not in template else text}


def prompt_text(example: dict[str, Any], recipe: Recipe, tokenizer) -> str:
    """The exact text the model sees before it should answer, rendered as in training (for generation):
    the prompt (chat-templated, with the assistant header, or through the prompt template), or a
    conversation up to (not including) its last assistant turn."""
    rendered = render(example, recipe, tokenizer)
    history = split_last_reply(rendered["messages"])[0] if "messages" in rendered else rendered["prompt"]
    if isinstance(history, str):
        return history
    return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)


def sft_defaults(recipe: Recipe) -> dict[str, Any]:
    """SFTConfig settings for the formatter's loss mask (``args.setdefault`` them); text trains on all."""
    kind = FORMATTERS[recipe.dataset.formatter].kind
    masks = {"messages": {"assistant_only_loss": True}, "prompt_completion": {"completion_only_loss": True}}
    return masks.get(kind, {})
