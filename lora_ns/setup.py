"""Train's set-up, shared with ``validate``: ONE path, so a recipe that passes validate does not fail
later in train.

`setup(recipe, dry_run)` builds what training builds, short of the weights and the optimizer:

- our own cross-field rules (`lora_ns.validate.rules`: only what the libraries do not check);
- the real ``SFTConfig`` / ``TrainingArguments`` (their ``__post_init__`` checks run; a ValueError is
  mapped to the recipe field it names) and the run's step count (zero steps is an error), and the
  loggers in ``report_to`` (each must be importable);
- the peft config object, applied to the model built on the meta device (`lora_ns.validate.model`);
- the tokenizer and chat template, and a sample of rows through the same formatter, renderer and
  tokenization as training (`lora_ns.validate.data`);
- the output dir (training refuses a finished run; validate warns).

``validate`` calls it with ``dry_run=True`` and stops there; ``train`` calls it with ``dry_run=False``,
then loads the weights. Errors raise `UserError` (one line each); warnings and info come back.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_ns.config import Recipe, load_recipe
from lora_ns.errors import Problem, UserError
from lora_ns.preference import PREFERENCE_TASKS  # light: TRL is imported lazily

# Keys of a recipe's `training:` section that lora_ns handles itself (not passed to the HF class).
LORA_NS_TRAINING_KEYS = {"overwrite_output_dir", "resume_from_checkpoint"}


@dataclass(frozen=True)
class Checks:
    """Which of the slower checks to run beside the rules and the training arguments."""

    data: bool = True
    model: bool = True
    accelerate_config: str | None = None


@dataclass
class Setup:
    """What the set-up built: the training arguments, and the warnings / info lines it found."""

    recipe: Recipe
    args: Any
    notes: list[Problem] = field(default_factory=list)


def setup(recipe: Recipe, dry_run: bool, checks: Checks = Checks()) -> Setup:
    """Check and build everything training needs before the weights (see the module docstring)."""
    from lora_ns.validate.rules import check_rules

    if not dry_run:
        from lora_ns.checkpoints import guard_output_dir

        guard_output_dir(recipe)  # refuse a finished run at once, before the slower checks
    problems = _raise_errors(check_rules(recipe, for_training=not dry_run))
    if dry_run and not (checks.model or checks.data):  # validate --no-model --no-data: schema and rules only
        return Setup(recipe, None, problems + _raise_errors(deep_problems(recipe, checks)))  # (and the launch)
    args = training_arguments(recipe)
    problems += _raise_errors(list(run_problems(recipe, args)))
    if recipe.peft.method != "full":
        peft_config_problem(recipe)
    problems += _raise_errors(deep_problems(recipe, checks))
    return Setup(recipe, args, problems)


def check_recipe_file(path: str | Path, overrides: list[str] | None = None, for_training: bool = False,
                      checks: Checks = Checks(), prog: str = "lora_ns.validate") -> Recipe:
    """Load a recipe and run `setup` on it; raise `UserError` with every error; print the notes."""
    recipe = load_recipe(path, overrides)
    print_notes(setup(recipe, dry_run=not for_training, checks=checks).notes, prog)
    return recipe


def print_notes(notes: list[Problem], prog: str) -> None:
    for note in notes:  # warnings, and "info" lines such as dataset length stats
        print(f"{prog}: {note.severity}: {note}", file=sys.stderr)


def _raise_errors(problems: list[Problem]) -> list[Problem]:
    errors = [p for p in problems if p.is_error]
    if errors:
        raise UserError(errors)
    return problems


def deep_problems(recipe: Recipe, checks: Checks) -> list[Problem]:
    """Checks that read the data sample, the model config, or the accelerate config."""
    problems: list[Problem] = []
    if checks.data:
        from lora_ns.validate.data import check_dataset

        problems += check_dataset(recipe)
    if checks.model and recipe.task != "pretrain":  # pretrain has no weights to check: lora_ns.pretrain
        from lora_ns.validate.model import check_model

        problems += check_model(recipe)
    if checks.accelerate_config:
        from lora_ns.validate.launch import check_launch

        problems += check_launch(recipe, checks.accelerate_config)
    return problems


# --- library errors, mapped to the recipe field they are about --------------------------------------

def field_for(message: str, given: dict[str, Any]) -> str | None:
    """The key of `given` a library's error message is about: named in it (the first one named), else
    the only key whose value appears in it as a word. None when neither says."""
    words = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|\w+", message)
    named = [k for k in given if k in words]
    if named:
        return min(named, key=lambda k: words.index(k))

    def appears(item: Any) -> bool:
        return str(item) in words or (isinstance(item, str) and len(item) >= 3 and item in message)

    valued = [k for k, v in given.items() if not isinstance(v, (bool, dict)) and v is not None
              and any(appears(item) for item in (v if isinstance(v, list) else [v]))]
    return valued[0] if len(valued) == 1 else None


def library_problem(recipe: Recipe, section: str, given: dict[str, Any], err: Exception,
                    docs: str) -> Problem:
    """One line for a library's ValueError, naming the field when the message lets us."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    key = field_for(reason, given)
    name = f"{section}.{key}" if key else section
    return recipe.problem(name, reason, f"fix {name} (see {docs})")


# --- training arguments ---------------------------------------------------------------------------

def training_defaults(recipe: Recipe) -> dict[str, Any]:
    """What lora_ns sets when the recipe's training section doesn't (see `lora_ns.train`'s docstring)."""
    import importlib.util

    import torch

    from lora_ns.model import gradient_checkpointing, torch_dtype

    dtype = torch_dtype(recipe.model.dtype)
    defaults: dict[str, Any] = {
        "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_total_limit": 2,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
    }
    if not {"gradient_checkpointing", "activation_checkpointing"} & recipe.training.keys():
        from transformers import TrainingArguments

        # transformers renamed the option (gradient_ -> activation_checkpointing) during 5.x: use this version's
        name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
            else "gradient_checkpointing"
        defaults[name] = gradient_checkpointing(recipe)
    if recipe.dataset.val_split is None:
        defaults["eval_strategy"] = "no"
    if recipe.task in PREFERENCE_TASKS:  # dpo/orpo/kto/grpo: lora_ns.preference
        from lora_ns.preference import training_defaults as preference_defaults

        defaults.update(preference_defaults(recipe))
    elif recipe.task != "seq_cls":
        from lora_ns.data import sft_defaults

        defaults.update(sft_defaults(recipe))  # the loss mask the formatter's kind needs
        if recipe.model.attn_implementation.startswith("flash_attention"):
            defaults.update(packing=True, packing_strategy="bfd")
        elif recipe.task != "pretrain" and not (recipe.dataset.streaming or recipe.training.get("packing")):
            defaults.update(sampler_defaults())  # sdpa/eager: batches of similar lengths, least padding
    return defaults


def sampler_defaults() -> dict[str, Any]:
    """Group rows of similar length into batches (HF's LengthGroupedSampler): the fastest exact choice with
    sdpa/eager, where padding-free rows attend over the whole batch (bench/README.md, "Padding")."""
    from transformers import TrainingArguments

    if hasattr(TrainingArguments, "train_sampling_strategy"):  # transformers 5.x; earlier: group_by_length
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def training_arguments_class(task: str):
    """SFTConfig (causal_lm, cpt), TrainingArguments (seq_cls) or TRL's DPOConfig, ... (preference tasks):
    only the one the task needs is imported."""
    if task in PREFERENCE_TASKS:
        from lora_ns.preference import config_class

        return config_class(task)
    if task == "seq_cls":
        from transformers import TrainingArguments

        return TrainingArguments
    from trl import SFTConfig

    return SFTConfig


def training_arguments(recipe: Recipe) -> Any:
    """The real SFTConfig / TrainingArguments from the recipe's training section; its own checks run."""
    from lora_ns.hf_fields import TASK_TRAINING_FIELDS

    ours = LORA_NS_TRAINING_KEYS | set(TASK_TRAINING_FIELDS.get(recipe.task, {}))
    given = {k: v for k, v in recipe.training.items() if k not in ours}
    args = {**training_defaults(recipe), **given, "output_dir": recipe.output_dir}
    try:
        return training_arguments_class(recipe.task)(**args)
    except ValueError as err:  # the HF classes check combinations of values in __post_init__
        raise UserError(library_problem(recipe, "training", given, err, "the HF TrainingArguments docs"))


def run_problems(recipe: Recipe, args) -> list[Problem]:
    """What the arguments object accepts but the Trainer then fails on (or silently does nothing with)."""
    problems = []
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        problems.append(recipe.problem("training.num_train_epochs",
                                       f"num_train_epochs {args.num_train_epochs} with no max_steps: "
                                       "the run would train 0 steps",
                                       "set training.num_train_epochs > 0 (or training.max_steps)"))
    problems += report_to_problems(recipe, args.report_to or [])
    return problems


def report_to_problems(recipe: Recipe, loggers: list[str]) -> list[Problem]:
    """Each logger in report_to must be importable: the Trainer otherwise fails after the model loaded."""
    if not [name for name in loggers if name not in ("none", "all")]:
        return []
    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    return [recipe.problem("training.report_to", f"logger '{name}' is not installed",
                           f"pip install {name}, or set training.report_to: none")
            for name in loggers if name not in ("none", "all") and name not in available]


def peft_config_problem(recipe: Recipe) -> None:
    """Build the peft config object (its own checks run); raise a UserError naming the field."""
    from lora_ns.adapters import peft_config

    try:
        peft_config(recipe)
    except (ValueError, TypeError) as err:
        docs = "the method's peft config docs"
        raise UserError(library_problem(recipe, "peft", recipe.peft.options, err, docs))
