"""Train's set-up, shared with ``validate`` (one path: a recipe that passes validate does not then fail):
our rules, the real training arguments (a ValueError mapped to the field it names), the peft config, the
model on the meta device, a data sample, and the output dir (fresh, interrupted: resumed, or finished: refused
unless ``overwrite_output_dir``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_ns.adapters import peft_config
from lora_ns.config import Recipe, load_recipe
from lora_ns.data import sft_defaults
from lora_ns.errors import Problem, UserError, first_line
from lora_ns.fileio import unwritable
from lora_ns.hf_fields import own_training_fields
from lora_ns.model import gradient_checkpointing, torch_dtype
from lora_ns.preference import PREFERENCE_TASKS, config_class

FINISHED_MARKER = "run_summary.json"  # written last by lora_ns.train
# Trainer writes weights, optimizer, scheduler and RNG state first and this file last: a checkpoint without it
# was cut off mid-save.
COMPLETE_MARKER = "trainer_state.json"


@dataclass(frozen=True)
class Checks:
    """Which of the slower checks to run beside the rules and the training arguments."""

    data: bool = True
    model: bool = True
    accelerate_config: str | None = None


@dataclass
class Setup:
    args: Any  # the training arguments object (None for validate --no-model --no-data)
    notes: list[Problem] = field(default_factory=list)  # warnings and info lines


def setup(recipe: Recipe, dry_run: bool, checks: Checks = Checks()) -> Setup:
    """Check and build everything training needs before the weights (see the module docstring)."""
    from lora_ns.validate.arguments import run_problems  # validate/__init__ imports this module
    from lora_ns.validate.rules import check_rules

    if not dry_run:
        guard_output_dir(recipe)  # refuse a finished run at once, before the slower checks
    problems = _raise_errors(check_rules(recipe, for_training=not dry_run))
    if dry_run and not (checks.model or checks.data):  # validate --no-model --no-data: no torch imported
        return Setup(None, problems + _raise_errors(deep_problems(recipe, checks)))
    args = training_arguments(recipe)
    problems += _raise_errors(run_problems(recipe, args))
    if recipe.peft.method != "full":
        try:
            peft_config(recipe)  # peft's own checks run
        except (ValueError, TypeError) as err:
            raise UserError(library_problem(recipe, "peft", recipe.peft.options, err, "the peft config docs"))
    return Setup(args, problems + _raise_errors(deep_problems(recipe, checks)))


def check_recipe_file(path: str | Path, overrides: list[str] | None = None, for_training: bool = False,
                      checks: Checks = Checks(), prog: str = "lora_ns.validate") -> Recipe:
    """Load a recipe and run `setup` on it; raise `UserError` with every error; print the notes."""
    recipe = load_recipe(path, overrides)
    print_notes(setup(recipe, dry_run=not for_training, checks=checks).notes, prog)
    return recipe


def print_notes(notes: list[Problem], prog: str) -> None:
    for note in notes:
        print(f"{prog}: {note.severity}: {note}", file=sys.stderr)


def _raise_errors(problems: list[Problem]) -> list[Problem]:
    if errors := [p for p in problems if p.is_error]:
        raise UserError(errors)
    return problems


def deep_problems(recipe: Recipe, checks: Checks) -> list[Problem]:
    """Checks that read the data sample, the model or the accelerate config (imported here: a cycle)."""
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


def field_for(message: str, given: dict[str, Any]) -> str | None:
    """The key of `given` a library's error message is about: named in it (the first one named), else the only
    key whose value appears in it as a word. None when neither says."""
    words = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|\w+", message)
    if named := [k for k in given if k in words]:
        return min(named, key=words.index)

    def appears(item: Any) -> bool:
        return str(item) in words or (isinstance(item, str) and len(item) >= 3 and item in message)

    valued = [k for k, v in given.items() if not isinstance(v, (bool, dict)) and v is not None
              and any(appears(item) for item in (v if isinstance(v, list) else [v]))]
    return valued[0] if len(valued) == 1 else None


def library_problem(recipe: Recipe, section: str, given: dict[str, Any], err: Exception,
                    docs: str) -> Problem:
    """One line for a library's ValueError, naming the field when the message lets us."""
    reason = first_line(err, 500)
    name = f"{section}.{key}" if (key := field_for(reason, given)) else section
    return recipe.problem(name, reason, f"fix {name} (see {docs})")


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
    if recipe.task == "grpo":
        defaults["remove_unused_columns"] = False  # the reward functions read the reference column
    elif recipe.task not in PREFERENCE_TASKS and recipe.task != "seq_cls":
        defaults.update(sft_defaults(recipe))  # the loss mask the formatter's kind needs
        if recipe.model.attn_implementation.startswith("flash_attention"):
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


def training_arguments(recipe: Recipe) -> Any:
    """The real SFTConfig / TrainingArguments from the recipe's training section; its own checks run."""
    ours = {"resume_from_checkpoint", *own_training_fields(recipe.task)}
    given = {k: v for k, v in recipe.training.items() if k not in ours}
    try:
        return training_arguments_class(recipe.task)(**{**training_defaults(recipe), **given,
                                                        "output_dir": recipe.output_dir})
    except (ValueError, ImportError) as err:  # __post_init__ checks values, and packages (deepspeed)
        problem = library_problem(recipe, "training", given, err, "the HF TrainingArguments docs")
        if isinstance(err, ImportError):
            problem = replace(problem, fix=f"install what it names, or remove {problem.field}")
        raise UserError(problem)


# --- output dir and checkpoints -------------------------------------------------------------------

def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / FINISHED_MARKER).exists()


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders, oldest step first (by number: 10 comes after 9). Not transformers'
    sort_checkpoints: validate's output-dir check runs without importing torch."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name[11:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def output_dir_problem(recipe: Recipe) -> Problem | None:
    """An output_dir that cannot be written, or that holds someone else's files (unless the recipe sets
    training.overwrite_output_dir: true); checked before anything loads, by validate and train alike."""
    out, name = Path(recipe.output_dir), "training.output_dir"
    if out.exists() and not out.is_dir():
        return recipe.problem(name, f"{out} is a file, not a folder", "choose another output_dir")
    if why := unwritable(out):
        return recipe.problem(name, why, "choose an output_dir you can write to")
    ours = not out.is_dir() or is_finished(out) or (out / "runs").is_dir() or checkpoints(out)
    files = [] if ours else sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if files and not recipe.training.get("overwrite_output_dir"):
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        return recipe.problem(name, f"{out} already holds files that are not a lora_ns run ({shown}); "
                              "training would overwrite them",
                              "choose a new or empty output_dir, or set training.overwrite_output_dir: true")
    return None


def guard_output_dir(recipe: Recipe) -> None:
    """Refuse an unusable output_dir, or a finished run unless the recipe allows overwriting it."""
    if problem := output_dir_problem(recipe):
        raise UserError(problem)
    out = Path(recipe.output_dir)
    if not is_finished(out):
        return
    if not recipe.training.get("overwrite_output_dir"):
        raise UserError(recipe.problem("training.output_dir", f"{out} already holds a finished run", "choose "
                                       "another output_dir, or set training.overwrite_output_dir: true"))
    if os.environ.get("RANK", "0") == "0":  # the other ranks see the result after the datasets barrier
        say(f"overwriting the finished run in {out}")
        for folder in checkpoints(out):
            shutil.rmtree(folder)
        (out / FINISHED_MARKER).unlink()


def safetensors_defect(path: Path) -> str | None:
    """Why a .safetensors file is not whole (bad header, or data shorter/longer than it says), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy"):  # reads and checks the header only
            return None
    except (SafetensorError, OSError) as err:
        why = first_line(err)
        return f"{path.name} is truncated or has no valid safetensors header ({why})"


def checkpoint_defect(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from: no trainer_state.json, or a weights, optimizer or
    scheduler file that is not whole. Reads headers and zip indexes only, never unpickles."""
    try:
        json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {COMPLETE_MARKER} (cut off mid-save)"
    for file in sorted(folder.iterdir()):
        if file.suffix == ".safetensors" and (why := safetensors_defect(file)):
            return why
        if file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):  # torch.save writes a zip
            return f"{file.name} is truncated or not a torch file"
    return None


def last_checkpoint(output_dir: str | Path, quiet: bool = False) -> str | None:
    """The newest checkpoint folder whose files are whole, or None; says which newer ones it skips and why."""
    for folder in reversed(checkpoints(output_dir)):
        if not (why := checkpoint_defect(folder)):
            return str(folder)
        if not quiet:
            say(f"skipping {folder}: {why}")
    return None


def say(message: str) -> None:
    """Print once per machine (every DDP rank runs the set-up)."""
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        print(f"lora_ns: {message}", file=sys.stderr)


def wanted_checkpoint(recipe: Recipe) -> str | None:
    """The recipe's resume_from_checkpoint as "auto" (the default), a path, or None (never resume); the
    config's type check has turned YAML booleans away, so only words and paths arrive here."""
    wanted = str(recipe.training.get("resume_from_checkpoint", "auto"))
    if wanted.lower() in ("none", "no", "false"):
        return None
    return "auto" if wanted.lower() in ("auto", "true", "last") else wanted


def resume_target(recipe: Recipe, quiet: bool = False) -> str | None:
    """What `Trainer.train(resume_from_checkpoint=...)` gets: for "auto" (the default) the newest complete
    checkpoint of an interrupted run, None for a fresh run or one that overwrites a finished run; an explicit
    path (checked by `setup`'s rules: `checkpoint_problem`)."""
    if (wanted := wanted_checkpoint(recipe)) is None or (wanted == "auto" and is_finished(recipe.output_dir)):
        return None
    if (found := last_checkpoint(recipe.output_dir, quiet) if wanted == "auto" else wanted) and not quiet:
        say(f"resuming from {found}")
    return found


def resume_problem(recipe: Recipe, model, checkpoint: str | None) -> Problem | None:
    """A checkpoint saved from another model than this recipe builds (peft r or target modules, the model or
    its vocabulary changed since): resuming would stop on a size mismatch or the optimizer's parameter groups.
    `model`: the trainer's, real or on the meta device; only the checkpoint's safetensors headers are read."""
    from safetensors import safe_open

    folder, adapter = Path(checkpoint or ""), hasattr(model, "peft_config")
    if checkpoint is None or not folder.is_dir():
        return None
    if adapter:
        from peft import get_peft_model_state_dict

        config = folder / "adapter_config.json"
        if config.is_file() and json.loads(config.read_text()).get("rank_pattern"):
            return None  # AdaLoRA after rank allocation saves pruned shapes; peft resizes ours to them
        ours, files = get_peft_model_state_dict(model), [folder / "adapter_model.safetensors"]
    else:
        ours, files = model.state_dict(), sorted(folder.glob("model*.safetensors"))
    saved: dict[str, list[int]] = {}
    for file in (f for f in files if f.is_file()):
        with safe_open(file, "pt") as weights:
            saved.update({name: list(weights.get_slice(name).get_shape()) for name in weights.keys()})
    shapes = {name: list(tensor.shape) for name, tensor in ours.items()}
    if differ := [name for name in sorted(saved.keys() & shapes.keys()) if saved[name] != shapes[name]]:
        why = f"{differ[0]} of shape {saved[differ[0]]}, this recipe builds {shapes[differ[0]]}"
    elif adapter and saved and saved.keys() != shapes.keys():
        name = min(saved.keys() ^ shapes.keys())
        why = f"{name} {'but this recipe has none' if name in saved else 'missing'} (other target modules)"
    else:
        return None
    return recipe.problem("peft" if adapter else "model.name_or_path", f"cannot resume from {checkpoint}: "
                          f"it was saved with {why}", "set the recipe back as that run had it, or train "
                          "afresh in another training.output_dir")


def checkpoint_problem(recipe: Recipe) -> Problem | None:
    """What is wrong with an explicit resume_from_checkpoint path, if anything (also a validate rule)."""
    if (wanted := wanted_checkpoint(recipe)) in (None, "auto"):
        return None
    if not Path(wanted).is_dir():
        return recipe.problem("training.resume_from_checkpoint", f"checkpoint {wanted} not found",
                              "point it at a checkpoint-<step> folder, or use auto")
    if why := checkpoint_defect(Path(wanted)):
        return recipe.problem("training.resume_from_checkpoint", f"cannot resume from {wanted}: {why}",
                              "point it at a complete checkpoint-<step> folder, or use auto")
    return None
