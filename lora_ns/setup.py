"""Train's set-up, shared with ``validate`` (one path: a recipe that passes validate does not then fail):
our rules, the real training arguments (a ValueError mapped to the field it names), the peft config, the
model on the meta device, a data sample, and the output dir (`lora_ns.checkpoints`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_ns.adapters import peft_config
from lora_ns.checkpoints import clear_finished_run, guard_output_dir
from lora_ns.config import Recipe, load_recipe
from lora_ns.data import sft_defaults
from lora_ns.errors import Problem, UserError, first_line, program
from lora_ns.hf_fields import own_training_fields
from lora_ns.model import gradient_checkpointing, packs, torch_dtype
from lora_ns.preference import PREFERENCE_TASKS, config_class
from lora_ns.pretrain import architecture_problem


@dataclass(frozen=True)
class Checks:
    """Which of the slower checks to run beside the rules and the training arguments."""

    data: bool = True
    model: bool = True
    accelerate_config: str | None = None
    processes: int | None = None  # the launch's processes, when not the accelerate config's num_processes
    gpu_memory: int | None = None  # validate --gpu-memory: checked for a GPU elsewhere, not this machine


@dataclass
class Setup:
    args: Any  # the training arguments object (None for validate --no-model --no-data)
    notes: list[Problem] = field(default_factory=list)  # warnings and info lines


def setup(recipe: Recipe, dry_run: bool, checks: Checks = Checks()) -> Setup:
    """Check and build everything training needs before the weights (see the module docstring)."""
    from lora_ns.validate.arguments import run_problems  # validate/__init__ imports this module
    from lora_ns.validate.launch import launch_processes
    from lora_ns.validate.rules import LEFT_OUT_WHEN_WARNED, check_rules

    if not dry_run:
        guard_output_dir(recipe)  # refuse a finished run at once, before the slower checks
    processes = checks.processes or launch_processes(checks.accelerate_config) if dry_run else 1
    problems = _raise_errors(check_rules(recipe, not dry_run, processes))
    if dry_run and not (checks.model or checks.data):  # validate --no-model --no-data: no torch imported
        return Setup(None, problems + _raise_errors(deep_problems(recipe, checks, dry_run)))
    if left_out := {p.field.removeprefix("training.") for p in problems} & LEFT_OUT_WHEN_WARNED:
        recipe = recipe.model_copy(update={"training": {k: v for k, v in recipe.training.items()
                                                         if k not in left_out}})
    args = training_arguments(recipe, processes)
    problems += _raise_errors(run_problems(recipe, args))
    if recipe.peft.method != "full":
        try:
            peft_config(recipe)  # peft's own checks run
        except (ValueError, TypeError) as err:
            raise UserError(library_problem(recipe, "peft", recipe.peft.options, err, "the peft config docs"))
    problems += _raise_errors(deep_problems(recipe, checks, dry_run))
    if not dry_run:
        clear_finished_run(recipe)
    return Setup(args, problems)


def check_recipe_file(path: str | Path, overrides: list[str] | None = None, for_training: bool = False,
                      checks: Checks = Checks(), prog: str = "lora_ns.validate") -> Recipe:
    """Load a recipe and run `setup` on it; raise `UserError` with every error; print the notes."""
    recipe = load_recipe(path, overrides)
    print_notes(setup(recipe, dry_run=not for_training, checks=checks).notes, prog)
    return recipe


def print_notes(notes: list[Problem], prog: str) -> None:
    for note in notes:
        print(f"{program(prog)}: {note.severity}: {note}", file=sys.stderr)


def _raise_errors(problems: list[Problem]) -> list[Problem]:
    if errors := [p for p in problems if p.is_error]:
        raise UserError(errors)
    return problems


def deep_problems(recipe: Recipe, checks: Checks, dry_run: bool = True) -> list[Problem]:
    """Checks that read the data sample, the model or the accelerate config (imported here: a cycle)."""
    problems: list[Problem] = []
    if checks.data:
        from lora_ns.validate.data import check_dataset

        problems += check_dataset(recipe, dry_run)
    if checks.model:
        from lora_ns.validate.model import check_model, flash_problem

        if recipe.task != "pretrain":
            problems += check_model(recipe, dry_run, this_machine=checks.gpu_memory is None)
        else:  # pretrain builds its model (lora_ns.pretrain) from model.config
            problems += [p for p in (flash_problem(recipe, dry_run), architecture_problem(recipe)) if p]
    if checks.accelerate_config:
        from lora_ns.validate.launch import check_launch

        problems += check_launch(recipe, checks.accelerate_config)
    return list({str(p): p for p in problems}.values())  # the tokenizer's problems: data and model checks


def _words(message: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|\w+", message)


def named_keys(message: str, given: dict[str, Any]) -> list[str]:
    """The keys of `given` a library's error message names, in the order it names them."""
    words = _words(message)
    return sorted((k for k in given if k in words), key=words.index)


def field_for(message: str, given: dict[str, Any]) -> str | None:
    """The key of `given` a library's error message is about: named in it (the first one named), else the only
    key whose value appears in it as a word. None when neither says."""
    if named := named_keys(message, given):
        return named[0]
    words = _words(message)

    def appears(item: Any) -> bool:
        return str(item) in words or (isinstance(item, str) and len(item) >= 3 and item in message)

    valued = [k for k, v in given.items() if not isinstance(v, (bool, dict)) and v is not None
              and any(appears(item) for item in (v if isinstance(v, list) else [v]))]
    return valued[0] if len(valued) == 1 else None


# Library messages whose first named key is not the one to change: message text -> (key, fix)
KNOWN_FIXES = {
    "saving steps to be a": ("save_steps", "make it a multiple of training.eval_steps"),
    "save and eval strategy to match": ("save_strategy", "set it as training.eval_strategy"),
    # GRPO's batches count the processes: validate sees them in --accelerate-config or --num-processes
    "must be divisible by num_generations": ("num_generations", "make it divide per_device_train_batch_size "
                                             "x processes x steps_per_generation"),
    "divisible by the global batch size": ("generation_batch_size", "make it a multiple of "
                                           "per_device_train_batch_size x processes"),
    "global eval batch size": ("per_device_eval_batch_size", "make it a multiple of num_generations (or of "
                               "num_generations_eval)"),
    # lora_ns turns on the mixed precision of model.dtype: the user set only the other one
    "fp16 and bf16 can be True": ("fp16", "remove training.fp16 and training.bf16: lora_ns sets the one "
                                  "model.dtype names (or set model.dtype: fp16)"),
}


def library_problem(recipe: Recipe, section: str, given: dict[str, Any], err: Exception,
                    docs: str) -> Problem:
    """One line for a library's ValueError, naming the field when the message lets us."""
    reason = first_line(err, 500)
    known = [fix for text, fix in KNOWN_FIXES.items() if text in reason and section == "training"]
    key, fix = known[0] if known else (field_for(reason, given), "")
    name = f"{section}.{key}" if key else section
    return recipe.problem(name, reason, fix or f"fix {name} (see {docs})")


# --- training arguments ---------------------------------------------------------------------------

def training_defaults(recipe: Recipe) -> dict[str, Any]:
    """What lora_ns sets when the recipe's training section doesn't (its keys win): resumable checkpoints,
    the answer-only loss mask the formatter's rows need, checkpointing only when quantized (faster), and
    the least padding: packing with flash attention, else batches of rows of similar length (see README)."""
    import importlib.util

    import torch
    from transformers import TrainingArguments

    dtype = torch_dtype(recipe.model.dtype)
    defaults: dict[str, Any] = {
        "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
        "logging_steps": 10, "save_strategy": "steps", "save_total_limit": 2,
        "use_cpu": not torch.cuda.is_available(),
        "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
    }
    if not {"gradient_checkpointing", "activation_checkpointing"} & recipe.training.keys():
        # transformers renamed it (gradient_ -> activation_checkpointing) during 5.x: use this version's name
        name = "activation_checkpointing" if hasattr(TrainingArguments, "activation_checkpointing") \
            else "gradient_checkpointing"
        defaults[name] = gradient_checkpointing(recipe)
    if recipe.dataset.val_split is None:
        defaults["eval_strategy"] = "no"
    if recipe.dataset.streaming:  # several processes: each reads the stream, keeping its share of each batch;
        # dispatched (accelerate's default for streams), the ranks' batches are joined: they pad unequally
        defaults["accelerator_config"] = {"dispatch_batches": False}
    if recipe.task == "grpo":
        defaults["remove_unused_columns"] = False  # the reward functions read the reference column
        if recipe.peft.method == "prompt_tuning":  # sample as training scores (see inference.generate)
            defaults["generation_kwargs"] = {"use_cache": False}
    elif recipe.task not in PREFERENCE_TASKS and recipe.task != "seq_cls":
        defaults.update(sft_defaults(recipe))  # the loss mask the formatter's kind needs
        if packs(recipe) and "packing" not in recipe.training:
            defaults.update(packing=True, packing_strategy="bfd")
        elif recipe.task != "pretrain" and not (recipe.dataset.streaming or recipe.training.get("packing")):
            # sdpa/eager: batch rows of similar length (HF's LengthGroupedSampler), the fastest exact choice:
            # padding-free rows attend over the whole batch (bench/README.md, "Padding")
            if hasattr(TrainingArguments, "train_sampling_strategy"):  # later 5.x; earlier: group_by_length
                defaults["train_sampling_strategy"] = "group_by_length"
            else:
                defaults["group_by_length"] = True
    return defaults


def training_arguments_class(task: str) -> type:
    """SFTConfig (causal_lm, cpt, pretrain), TrainingArguments (seq_cls) or TRL's DPOConfig, ..."""
    if task in PREFERENCE_TASKS:
        return config_class(task)
    from transformers import TrainingArguments
    from trl import SFTConfig

    return TrainingArguments if task == "seq_cls" else SFTConfig


def training_value(recipe: Recipe, key: str) -> Any:
    """A training field as the trainer's config takes it: the recipe's, else the config class's default
    (without building the config, whose batch checks depend on the launch)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(training_arguments_class(recipe.task))}
    return recipe.training.get(key, defaults.get(key))


def training_arguments(recipe: Recipe, processes: int = 1) -> Any:
    """The real SFTConfig / TrainingArguments from the recipe's training section; its own checks run, for
    `processes` processes (validate runs in one; in a launched rank the real count is used)."""
    ours = {"resume_from_checkpoint", *own_training_fields(recipe.task)}
    given = {k: v for k, v in recipe.training.items() if k not in ours}
    cls, defaults = training_arguments_class(recipe.task), training_defaults(recipe)
    if processes > 1 and recipe.task == "grpo":  # TRL sizes its generation batch by the launch's processes
        cls = type(cls.__name__, (cls,), {"world_size": property(lambda _: processes)})
    # a mapping the recipe also gives (generation_kwargs, accelerator_config) keeps our keys it leaves out
    given |= {k: {**defaults[k], **v} for k, v in given.items() if isinstance(defaults.get(k), dict)
              and isinstance(v, dict)}
    try:
        return cls(**{**defaults, **given, "output_dir": recipe.output_dir})
    except (ValueError, ImportError) as err:  # __post_init__ checks values, and packages (deepspeed)
        problem = library_problem(recipe, "training", given, err, f"the {cls.__name__} docs")
        if isinstance(err, ImportError):
            problem = replace(problem, fix=f"install what it names, or remove {problem.field}")
        raise UserError(problem)
