"""Cross-field rules, each a small named function from a Recipe to its problems (listed in RULES), run
without weights inside train's set-up (`lora_ns.setup`), which then builds the real SFTConfig /
TrainingArguments and peft config: what those reject themselves is not repeated. These cover what the
libraries accept, then fail on mid-run or silently train nothing with."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from lora_ns.builtin_models import is_builtin, unknown_builtin
from lora_ns.checkpoints import checkpoint_problem, finished_run_fix, is_finished, output_dir_problem
from lora_ns.config import HOME_PATHS, Recipe
from lora_ns.data.formatters import FORMATTERS
from lora_ns.data.loading import unknown_formatter
from lora_ns.data.sources import looks_local
from lora_ns.errors import Problem
from lora_ns.preference import check_preference_recipe
from lora_ns.pretrain import check_pretrain
from lora_ns.run_record import is_secret
from lora_ns.validate.adapter import (
    checkpointing_fits_method, init_adapter_fits, method_fits_trainer, peft_values, quantization_fits_method,
)

Rule = Callable[[Recipe], Iterator[Problem]]


def classifier_fields(r: Recipe) -> Iterator[Problem]:
    """The classes a seq_cls recipe names, and the fields only a classifier reads or only it ignores. (The
    head needs no rule: for SEQ_CLS peft itself adds classifier/score to modules_to_save.)"""
    m = r.model
    if r.task == "seq_cls" and not (m.num_labels or m.labels):
        yield r.problem("model.num_labels", "seq_cls needs the number of classes",
                        "set model.num_labels (e.g. 2)")
    for key in [k for k in ("num_labels", "labels") if getattr(m, k)] if r.task != "seq_cls" else []:
        yield r.problem(f"model.{key}", f"only a classifier (task: seq_cls) has classes: ignored by {r.task}",
                        f"remove model.{key}, or set task: seq_cls", "warning")
    if m.num_labels and m.labels and m.num_labels != len(m.labels):
        yield r.problem("model.labels", f"{len(m.labels)} names for num_labels={m.num_labels}",
                        "give one name per class")
    if m.labels and len(set(m.labels)) != len(m.labels):
        twice = sorted({name for name in m.labels if m.labels.count(name) > 1})
        yield r.problem("model.labels", f"{', '.join(twice)} named twice (label ids map names one to one)",
                        "give each class its own name")
    if r.dataset.pairs is not None and r.task != "seq_cls":
        yield r.problem("dataset.pairs", f"only a classifier reads sentence pairs: ignored by {r.task}",
                        "remove dataset.pairs", "warning")
    if r.dataset.system_prompt and r.task == "seq_cls":
        yield r.problem("dataset.system_prompt", "a classifier reads its texts as they are, not as a chat: "
                        "ignored by seq_cls", "remove dataset.system_prompt", "warning")


def data_splits(r: Recipe) -> Iterator[Problem]:
    strategy, v = str(r.training.get("eval_strategy", "no")), r.dataset.val_split
    if strategy != "no" and v is None:
        yield r.problem("training.eval_strategy", f"eval_strategy '{strategy}' but no validation data",
                        "set dataset.val_split (a split name or a fraction like 0.1)")
    if r.training.get("eval_on_start") and v is None:
        yield r.problem("training.eval_on_start", "eval_on_start but no validation data",
                        "set dataset.val_split, or training.eval_on_start: false")
    if isinstance(v, float) and not 0 < v < 1:
        yield r.problem("dataset.val_split", f"fraction {v} is not between 0 and 1", "use e.g. 0.1")
    if isinstance(v, str) and (v in (r.dataset.path, r.dataset.split) or same_file(v, r.dataset.path)):
        yield r.problem("dataset.val_split", f"'{v}' is the training data itself: eval loss would measure "
                        "memorisation", "give held-out rows (another file or split), or a fraction like 0.1",
                        "warning")
    if r.dataset.streaming and int(r.training.get("max_steps", -1)) <= 0:
        yield r.problem("training.max_steps", "a streamed dataset has no length, so epochs are undefined",
                        "set training.max_steps")
    local = looks_local(r.dataset.path)
    for key in [k for k in ("name", "revision") if local and getattr(r.dataset, k)]:
        yield r.problem(f"dataset.{key}", f"only a Hub dataset has a {key}: ignored for {r.dataset.path}",
                        f"remove dataset.{key}", "warning")


def same_file(a: str, b: str) -> bool:
    return Path(a).is_file() and Path(b).is_file() and Path(a).resolve() == Path(b).resolve()


# training values the configs accept, then the run stops on (divides by, batches with, pads with, ...);
# num_iterations, steps_per_generation and generation_batch_size are GRPO's
LEAST = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1,
         "pad_to_multiple_of": 1, "eval_accumulation_steps": 1, "neftune_noise_alpha": 0,
         "dataset_num_proc": 0, "padding_value": 0, "num_iterations": 1, "steps_per_generation": 1,
         "generation_batch_size": 1, "weight_decay": 0}  # below 0 the optimizer grows the weights


def finite_numbers(r: Recipe) -> Iterator[Problem]:
    """YAML's .nan and .inf, which the libraries take: a learning_rate or weight_decay of them trained NaN
    weights to a "finished" run, and adam_epsilon: .inf trained nothing."""
    for section, body in (("training", r.training), ("peft", r.peft.options)):
        for key, value in body.items():
            if isinstance(value, float) and not math.isfinite(value):
                yield r.problem(f"{section}.{key}", f"{value} is not a finite number", "write a number" + (
                    " (0 turns clipping off)" if key == "max_grad_norm" else ""))


def values_in_range(r: Recipe) -> Iterator[Problem]:
    """Values SFTConfig / TrainingArguments / LoraConfig accept, then crash on (or learn nothing from).
    The schema has checked their types (int / float, or None where the HF field allows it)."""
    t = r.training
    for key, least in LEAST.items():
        if isinstance(v := t.get(key), (int, float)) and v < least:
            yield r.problem(f"training.{key}", f"{key} is {v}: it must be at least {least}",
                            f"set training.{key} to {least} or more")
    if (lr := t.get("learning_rate")) is not None and lr <= 0:  # 0: a control run, else a slip
        what = "is negative" if lr < 0 else "never changes the weights: the run learns nothing"
        yield r.problem("training.learning_rate", f"learning_rate {lr} {what}",
                        "use a positive rate such as 2e-4", "error" if lr < 0 else "warning")
    if (smoothing := t.get("label_smoothing_factor")) is not None and not 0 <= smoothing < 1:
        yield r.problem("training.label_smoothing_factor", f"{smoothing} is outside [0, 1): the loss "
                        "would reward wrong tokens", "use 0 (off) or a small share such as 0.1")
    if (n := t.get("max_length")) is not None and n < 1:
        yield r.problem("training.max_length", f"max_length {t['max_length']} leaves no tokens",
                        "set training.max_length (e.g. 1024), or null for no truncation")
    if isinstance(pad := t.get("pad_to_multiple_of"), str) and pad != "auto":  # TRL's one word for it
        yield r.problem("training.pad_to_multiple_of", f"got '{pad}'", "use a number (e.g. 8) or auto")
    for key in ("seed", "data_seed"):  # set_seed passes them to numpy, which takes 0..2**32-1 only
        if (v := t.get(key)) is not None and not 0 <= v < 2 ** 32:
            yield r.problem(f"training.{key}", f"{key} {v} is outside 0..2**32-1", f"set training.{key}: 42")
    for key, strategy in (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")):
        on = str(t.get(strategy, "steps" if key == "save_steps" else "no")) == "steps"
        if on and (v := t.get(key)) is not None and v <= 0:
            yield r.problem(f"training.{key}", f"{key} {t[key]} with {strategy} 'steps' never fires",
                            f"set training.{key} > 0 (a step count, or a fraction < 1 of the run)")
    if t.get("dataloader_persistent_workers") and not t.get("dataloader_num_workers"):  # torch's DataLoader
        yield r.problem("training.dataloader_persistent_workers", "keeps worker processes alive, and "
                        "dataloader_num_workers is 0 (no workers): the first batch stops the run",
                        "set training.dataloader_num_workers (e.g. 2), or remove it")


def names_resolve(r: Recipe) -> Iterator[Problem]:
    """The formatter and builtin model exist, and the formatter's rows fit the task."""
    fmt, name = FORMATTERS.get(r.dataset.formatter), r.model.name_or_path
    wanted = {"seq_cls": ("pair",), "cpt": ("text",), "pretrain": ("text",),
              "causal_lm": ("prompt_completion", "messages", "text")}.get(r.task)  # preference: its own check
    if problem := unknown_formatter(r):
        yield problem
    elif wanted and fmt.kind not in wanted:
        yield r.problem("dataset.formatter", f"formatter '{r.dataset.formatter}' gives {fmt.kind} rows, "
                        f"task {r.task} needs {' or '.join(wanted)}", "pick a formatter made for this task")
    if problem := unknown_builtin(name, r.source, r.lines.get("model.name_or_path")):
        yield problem
    target = r.peft.options.get("target_modules")  # a string is a regex to peft: "all_linear" matches nothing
    spelt = isinstance(target, str) and re.sub(r"[\W_]", "", target.lower()) == "alllinear"
    if spelt and target != "all-linear":
        yield r.problem("peft.target_modules", f"'{target}' names no module", "did you mean 'all-linear'?")
    if r.model.trust_remote_code:
        yield r.problem("model.trust_remote_code", "the model's own Python code will run on this machine",
                        "keep it only for a model you trust", severity="warning")


def no_shell_variables(r: Recipe) -> Iterator[Problem]:
    """A path holding "$SCRATCH": no shell reads a recipe, and output_dir made a folder of that name."""
    for section, names in HOME_PATHS.items():
        body = r.training if section == "training" else dict(getattr(r, section))
        for name in names:
            value = body.get(name)
            if isinstance(value, str) and re.search(r"\$\{?[A-Za-z_]", value) and (
                    name != "chat_template" or value.endswith(".jinja")):  # else template text
                yield r.problem(f"{section}.{name}", f"{value} holds a shell variable: a recipe is not read "
                                "by a shell", "write the path out, or set it on the command line, where the "
                                f"shell expands it: {section}.{name}={value}")


def local_model_paths_exist(r: Recipe) -> Iterator[Problem]:
    """A model path that can only be local must exist: a hub lookup of it fails obscurely; so must a DeepSpeed
    JSON (read from where training starts). (Data paths are lora_ns.data's: globs, folders and samples; a
    leading ~ was expanded as the recipe loaded: config.HOME_PATHS.)"""
    values = {f"model.{f}": getattr(r.model, f) for f in ("name_or_path", "tokenizer_name_or_path")}
    values["training.chat_template_path"] = r.training.get("chat_template_path")
    for field, value in values.items():
        local = value and (value.startswith(("/", "./", "../", "~")) or value.endswith(".jinja")
                           or field.endswith("chat_template_path") and "/" not in value)  # nor owner/name
        if local and not Path(value).exists():
            yield r.problem(field, f"{value} not found", "check the path, or use a hub id")
    name = r.model.name_or_path
    if r.model.revision and (is_builtin(name) or Path(name).is_dir()):
        yield r.problem("model.revision", f"only a Hub model has a revision: ignored for {name}",
                        "remove model.revision", "warning")
    if isinstance(ds := r.training.get("deepspeed"), str) and not Path(ds).is_file():
        yield r.problem("training.deepspeed", f"DeepSpeed config {ds} not found", "give the JSON's path from "
                        "where training starts, or launch with an accelerate DeepSpeed config instead")
    if (r.training.get("dataset_kwargs") or {}).get("skip_prepare_dataset"):  # TRL then gets untokenized rows
        yield r.problem("training.dataset_kwargs", "skip_prepare_dataset: lora_ns's rows are text that TRL "
                        "tokenizes", "remove training.dataset_kwargs.skip_prepare_dataset")


# --- safety and reliability -----------------------------------------------------------------------

def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) for every leaf of the recipe (list items under their list's path)."""
    if isinstance(node, (dict, list)):
        for key, value in node.items() if isinstance(node, dict) else ((None, v) for v in node):
            yield from _walk(value, path if key is None else f"{path}.{key}" if path else str(key))
    else:
        yield path, node


def no_secrets_in_recipe(r: Recipe) -> Iterator[Problem]:
    """Recipes are copied into the output dir, logs and model cards: tokens belong in the environment.
    The value is never echoed, so the message itself cannot leak it."""
    for path, value in _walk(r.model_dump(), ""):
        if path == "training.hub_token" and value:
            yield r.problem(path, "a hub token in a recipe is copied into the output dir and logs",
                            "export HF_TOKEN instead (huggingface_hub reads it from the environment)")
        elif is_secret(path.rsplit(".", 1)[-1], value):
            yield r.problem(path, "this looks like a secret token (value not shown)",
                            "export HF_TOKEN instead and remove it from the recipe")


def resume_checkpoint_exists(r: Recipe) -> Iterator[Problem]:
    if problem := checkpoint_problem(r):
        yield problem


def output_dir_usable(r: Recipe) -> Iterator[Problem]:
    if problem := output_dir_problem(r):
        yield problem
    elif is_finished(r.output_dir) and not r.training.get("overwrite_output_dir"):
        yield r.problem("training.output_dir", f"{r.output_dir} already holds a finished run: training will "
                        "refuse it", finished_run_fix(r.output_dir), "warning")


def checkpoints_are_saved(r: Recipe) -> Iterator[Problem]:
    """Checkpoint settings next to save_strategy "no" save nothing, so the run cannot be resumed."""
    asked = [k for k in ("save_steps", "save_total_limit") if k in r.training]
    if asked and str(r.training.get("save_strategy", "steps")) == "no":
        yield r.problem(f"training.{asked[0]}", "no checkpoints are saved (save_strategy is 'no'), "
                        "so an interrupted run cannot resume", "set training.save_strategy: steps", "warning")


RULES: list[Rule] = [
    finite_numbers, quantization_fits_method, checkpointing_fits_method, method_fits_trainer, peft_values,
    classifier_fields, data_splits, values_in_range, names_resolve, no_shell_variables,
    local_model_paths_exist, no_secrets_in_recipe, resume_checkpoint_exists, output_dir_usable,
    checkpoints_are_saved, init_adapter_fits, check_preference_recipe, check_pretrain,
]


# training keys that need a CUDA GPU, which SFTConfig / TrainingArguments accept on any machine
NEEDS_GPU = {"fp16": "fp16 mixed precision", "activation_offloading": "activation offloading (GPU to CPU)",
             "use_vllm": "vLLM generation (grpo)", "tf32": "TF32 matmul (Ampere or newer)"}


def hardware_problems(r: Recipe, for_training: bool) -> Iterator[Problem]:
    """`NEEDS_GPU` keys without a CUDA GPU: an error when training, a warning when only validating (a recipe
    is often checked on a laptop before it runs on a GPU machine). bf16 on a GPU without it is
    TrainingArguments' own error, mapped to training.bf16 by the set-up."""
    if not (wanted := [key for key in NEEDS_GPU if r.training.get(key)]):
        return
    if not for_training and not Path("/proc/driver/nvidia/version").exists() and "torch" not in sys.modules:
        cuda = False  # no NVIDIA driver: skip importing torch (seconds) just to hear that from it
    else:
        import torch

        cuda = torch.cuda.is_available()
    for key in wanted if not cuda else ():
        yield r.problem(f"training.{key}", f"{NEEDS_GPU[key]} needs a CUDA GPU and none is visible",
                        f"set training.{key}: false (or train on a GPU machine)",
                        "error" if for_training else "warning")
    if "use_vllm" in wanted and cuda and importlib.util.find_spec("vllm") is None:  # GRPOTrainer: after load
        yield r.problem("training.use_vllm", "vLLM generation needs the vllm package, which is not installed",
                        "pip install 'trl[vllm]' where training runs, or set training.use_vllm: false",
                        "error" if for_training else "warning")


def package_problems(r: Recipe, for_training: bool) -> Iterator[Problem]:
    """A DeepSpeed config without deepspeed installed (TrainingArguments imports it); ORPO's samples logged
    with no logger that takes them. As with `hardware_problems`: an error when training, a warning when
    validating on another machine."""
    severity = "error" if for_training else "warning"
    if r.training.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        yield r.problem("training.deepspeed", "deepspeed is not installed",
                        "pip install 'lora_ns[deepspeed]' where training runs, or remove training.deepspeed",
                        severity)
    loggers = ("wandb", "comet_ml")  # where ORPO's generate_during_eval sends its samples
    if r.training.get("generate_during_eval") and not any(map(importlib.util.find_spec, loggers)):
        yield r.problem("training.generate_during_eval", "its samples go to Weights & Biases or Comet, and "
                        "neither is installed", "pip install wandb where training runs (report_to: wandb), "
                        "or remove training.generate_during_eval", severity)


def single_process_problems(r: Recipe, processes: int = 1) -> Iterator[Problem]:
    """ddp_backend or fsdp in a run of one process (no launcher set WORLD_SIZE): accelerate asks torch for the
    world size of a process group nobody started (ddp_backend), and the Trainer refuses fsdp outside
    distributed training. Both only matter across processes, so a run of one leaves them out (see
    `LEFT_OUT_WHEN_WARNED`); validating for a launch config of several `processes`, that is only said."""
    if int(os.environ.get("WORLD_SIZE") or 1) > 1:
        return
    for key in (k for k in ("ddp_backend", "fsdp") if r.training.get(k)):
        value = r.training[key]
        if processes > 1:
            yield r.problem(f"training.{key}", f"{key} '{value}' is for the {processes} launched processes: "
                            "checked here without it", severity="info")
        else:
            config = "fsdp2" if key == "fsdp" else "multi_gpu"
            launch = f"accelerate launch --config_file accelerate_configs/{config}.yaml -m lora_ns.train"
            yield r.problem(f"training.{key}", f"{key} '{value}' applies under a launcher of several "
                            "processes; a run of one (as here) leaves it out",
                            f"to use it, train with {launch}", "warning")


# training keys a warning above says this machine or launch cannot use: the set-up builds the arguments
# without them (TrainingArguments refuses tf32 without an Ampere GPU, a ddp_backend without a launcher, and a
# DeepSpeed config without deepspeed; the Trainer refuses fsdp in one process)
LEFT_OUT_WHEN_WARNED = {"tf32", "ddp_backend", "fsdp", "deepspeed"}


def hub_problems(r: Recipe, for_training: bool) -> Iterator[Problem]:
    """push_to_hub needs the Hub and a login where training runs (the Trainer finds out after the weights
    load). As with `hardware_problems`: an error when training, a warning when validating elsewhere."""
    if not r.training.get("push_to_hub"):
        return
    from huggingface_hub import constants, get_token

    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None if get_token() else "no login here"
    if why:  # (the token itself is never shown)
        yield r.problem("training.push_to_hub", f"push_to_hub, but {why}", "run `hf auth login` (or set "
                        "HF_TOKEN) where training runs, or set push_to_hub: false", "error" if for_training
                        else "warning")


def check_rules(r: Recipe, for_training: bool = False, processes: int = 1) -> list[Problem]:
    """Every rule; `processes`: how many the launch config being validated for starts."""
    here = [*hardware_problems(r, for_training), *package_problems(r, for_training),
            *hub_problems(r, for_training), *single_process_problems(r, processes)]
    problems, wrong = [], set()  # a field's first error alone: "nan", not also "outside [0, 1)"
    for problem in [p for rule in RULES for p in rule(r)] + here:  # here: what the machine and launch decide
        if not (problem.is_error and problem.field in wrong):
            problems.append(problem)
            wrong |= {problem.field} if problem.is_error else set()
    return problems
