"""Checks of the built training arguments (SFTConfig, TrainingArguments, TRL's preference configs): what
they accept but the Trainer then fails on after the weights load, or silently does nothing with.
`lora_ns.setup` runs `run_problems` on the real arguments object, for validate and train alike."""

from __future__ import annotations

from pathlib import Path

from lora_ns.checkpoints import resume_target
from lora_ns.config import SFT_TASKS, Recipe
from lora_ns.errors import Problem, first_line, suggest


def run_problems(recipe: Recipe, args) -> list[Problem]:
    """What the built training arguments accept but the Trainer then fails on, after the weights load (or
    silently does nothing with); `lora_ns.setup` runs it on the real arguments object."""
    problems = []
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        epochs = args.num_train_epochs
        problems.append(recipe.problem("training.num_train_epochs", f"num_train_epochs {epochs} with no "
                                       "max_steps: the run would train 0 steps",
                                       "set training.num_train_epochs > 0 (or training.max_steps)"))
    if args.max_steps > 0 and args.warmup_steps >= args.max_steps:  # a warmup_steps below 1 is a share
        problems.append(recipe.problem(
            "training.warmup_steps", f"warmup_steps {args.warmup_steps:g} spans the whole run of max_steps "
            f"{args.max_steps}: the learning rate never reaches learning_rate",
            "lower it, or give a share of the run (e.g. 0.03)", "warning"))
    from accelerate.utils import DynamoBackend
    from transformers.integrations import get_available_reporting_integrations
    from transformers.utils import is_liger_kernel_available

    # report_to is a list by now ("none" -> [], "all" -> what is installed); else Trainer fails after the load
    problems += [recipe.problem("training.report_to", f"logger '{name}' is not installed",
                                f"pip install {name}, or set training.report_to: none")
                 for name in args.report_to or [] if name not in get_available_reporting_integrations()]
    if getattr(args, "use_liger_kernel", False) and not is_liger_kernel_available():
        problems.append(recipe.problem("training.use_liger_kernel", "needs the liger-kernel package",
                                       "pip install liger-kernel (CUDA), or set use_liger_kernel: false"))
    if (args.gradient_checkpointing_kwargs or {}).get("selective") and not args.gradient_checkpointing:
        problems.append(recipe.problem("training.gradient_checkpointing_kwargs", "selective checkpointing "
                                       "with checkpointing off", "set training.gradient_checkpointing: true"))
    if args.gradient_checkpointing:  # the first key torch's checkpoint does not take
        keywords, kwargs = checkpoint_kwargs(), sorted(args.gradient_checkpointing_kwargs or {})
        if unknown := next((k for k in kwargs if k not in keywords), None):
            problems.append(recipe.problem("training.gradient_checkpointing_kwargs", f"torch's checkpoint "
                                           f"takes no '{unknown}' (it would stop at the first step)",
                                           suggest(unknown, keywords)))
    accumulation = getattr(args.accelerator_config, "gradient_accumulation_kwargs", None) or {}
    steps = accumulation.get("num_steps")
    if steps and args.gradient_accumulation_steps > 1:  # the Trainer refuses both as it starts
        problems.append(recipe.problem("training.gradient_accumulation_steps", "set beside accelerator_config"
                                       f"'s gradient_accumulation_kwargs num_steps ({steps})",
                                       "keep one of them"))
    if args.optim_args and not all("=" in item for item in args.optim_args.replace(" ", "").split(",")):
        problems.append(recipe.problem("training.optim_args", f"'{args.optim_args}' is not key=value pairs",
                                       "write them as key=value,key=value (e.g. betas=0.9)"))
    backends = [b.value for b in DynamoBackend]  # torch.compile's; accelerate checks them at Trainer start
    if (backend := args.torch_compile_backend) and backend.upper() not in backends:
        problems.append(recipe.problem("training.torch_compile_backend", f"unknown backend '{backend}'",
                                       suggest(backend.lower(), [b.lower() for b in backends])))
    if args.save_strategy == "best" and not args.metric_for_best_model:
        problems.append(recipe.problem("training.save_strategy", "save_strategy 'best' with nothing to "
                                       "compare", "set training.metric_for_best_model (e.g. loss)"))
    sft = hasattr(args, "packing")  # SFTConfig; DPOConfig has padding_free but no packing
    if sft and args.packing and args.max_length is None:  # SFTTrainer refuses it as it starts
        problems.append(recipe.problem("training.max_length", "null, and packing needs the row length it "
                                       "packs to", "set training.max_length (e.g. 2048)"))
    if args.torch_compile_mode and args.torch_compile_mode not in (modes := _compile_modes()):  # first step
        problems.append(recipe.problem("training.torch_compile_mode", f"got '{args.torch_compile_mode}'",
                                       suggest(args.torch_compile_mode, modes)))
    if isinstance(cache := getattr(args, "cache_implementation", None), str):  # GRPO's GenerationConfig
        from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS  # (at its start)

        if cache not in (known := (*ALL_CACHE_IMPLEMENTATIONS, "paged")):
            problems.append(recipe.problem("training.cache_implementation", f"got '{cache}'",
                                           suggest(cache, known)))
    if sft and getattr(args, "padding_free", False) and not args.packing and args.max_length is not None:
        problems.append(recipe.problem(  # SFTTrainer refuses it: padding-free rows are not truncated
            "training.padding_free", "padding_free without packing does not cut rows to max_length",
            "set training.max_length: null (rows as they are), or training.packing: true"))
    problems += choice_problems(recipe, args)
    checks = (optimizer_problem, scheduler_problem, best_model_metric_problem)
    return problems + [p for p in (check(recipe, args) for check in checks) if p]


def _compile_modes() -> list[str]:
    import torch._inductor

    return list(torch._inductor.list_mode_options())


def choice_problems(recipe: Recipe, args) -> list[Problem]:
    """Values outside the choices a field's own metadata lists (TRL's loss_type, packing_strategy, ...):
    the config accepts them, the trainer refuses them after the weights load."""
    import dataclasses

    fields = {f.name: f.metadata["choices"] for f in dataclasses.fields(args) if "choices" in f.metadata}
    return [recipe.problem(f"training.{name}", f"got '{value}'", suggest(str(value), list(fields[name])))
            for name, value in recipe.training.items()
            if name in fields and isinstance(value, str) and value not in fields[name]]


def checkpoint_kwargs() -> set[str]:
    """What gradient_checkpointing_kwargs may hold: `torch.utils.checkpoint.checkpoint`'s keywords, and TRL's
    "selective"."""
    import inspect

    from torch.utils.checkpoint import checkpoint

    keywords = inspect.signature(checkpoint).parameters.values()
    return {p.name for p in keywords if p.kind == p.KEYWORD_ONLY} | {"preserve_rng_state", "selective"}


# What an evaluation reports, by task: lora_ns's classification metrics, TRL 1.16's SFT token metrics and
# preference metrics (tests/test_one_path.py and tests/test_preference.py evaluate and compare, so a rename
# upstream fails there). GRPO evaluates by generating: not checked.
_PAIR = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
         "logits/chosen", "logits/rejected")
EVAL_METRICS = {"seq_cls": ("loss", "accuracy", "f1", "precision", "recall"),
                **{task: ("loss", "entropy", "mean_token_accuracy", "num_tokens") for task in SFT_TASKS},
                "dpo": (*_PAIR, "rewards/accuracies", "entropy", "mean_token_accuracy", "num_tokens"),
                "kto": (*_PAIR, "kl", "entropy", "num_tokens"),
                "orpo": (*_PAIR, "rewards/accuracies", "nll_loss", "log_odds_ratio", "log_odds_chosen")}


def best_model_metric_problem(recipe: Recipe, args) -> Problem | None:
    """A metric_for_best_model the evaluation does not report: the Trainer stops at its first evaluation."""
    wanted, known = args.metric_for_best_model, EVAL_METRICS.get(recipe.task)
    if not wanted or known is None or wanted.removeprefix("eval_") in known:
        return None
    return recipe.problem("training.metric_for_best_model", f"'{wanted}' is not a metric the {recipe.task} "
                          "evaluation reports: training would stop at its first evaluation",
                          suggest(wanted.removeprefix("eval_"), known))


# torch's optimizers check their settings when built (after the weights load): message -> recipe key
OPTIMIZER_FIELDS = {"beta parameter at index 0": "adam_beta1", "beta parameter at index 1": "adam_beta2",
                    "epsilon": "adam_epsilon", "learning rate": "learning_rate",
                    "weight_decay": "weight_decay"}


def optimizer_problem(recipe: Recipe, args) -> Problem | None:
    """The Trainer picks and builds its optimizer after the weights load: a package it needs is checked now,
    and a torch optimizer is built on one parameter, so out-of-range settings (adam_beta1: 1.5) fail now."""
    import torch
    from transformers import Trainer

    optim = getattr(args.optim, "value", args.optim)
    try:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as err:  # ValueError: its other checks need the model, so only "install"
        if isinstance(err, ImportError) or "install" in str(err).lower():
            return recipe.problem("training.optim", f"optim '{optim}': {first_line(err, 200)}",
                                  "install it, or use another training.optim (e.g. adamw_torch)")
        return None
    if isinstance(eps := kwargs.get("eps"), (int, float)) and eps <= 0:  # torch takes 0: 0 / (sqrt(0) + 0)
        return recipe.problem("training.adam_epsilon", f"{eps}: a weight with no gradient yet (LoRA's A at "
                              "the first step) is updated by 0/0 and turns NaN", "use 1e-8 (the default)")
    if not cls.__module__.startswith(("torch.optim", "transformers.")):  # bitsandbytes etc. may need a GPU
        return None
    try:
        optimizer = cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError) as err:
        key = next((k for words, k in OPTIMIZER_FIELDS.items() if words in str(err)), None)
        field = f"training.{key}" if key else "training.optim_args"
        return recipe.problem(field, f"optim '{optim}' refuses it: {first_line(err, 200)}",
                              f"set {field} within the optimizer's valid range" if key else
                              "fix training.optim_args (the optimizer's own keyword names)")
    return resumed_optimizer_problem(recipe, optim, optimizer)


def resumed_optimizer_problem(recipe: Recipe, optim: str, optimizer) -> Problem | None:
    """A checkpoint saved by another optimizer: torch takes its parameter groups as saved, and the first step
    reads a setting they lack (sgd after adamw: KeyError 'momentum'). Tensors stay on disk (mmap)."""
    import torch

    state = Path(resume_target(recipe, quiet=True) or "", "optimizer.pt")
    if not state.is_file():
        return None
    try:
        saved = torch.load(state, map_location="cpu", weights_only=True, mmap=True)["param_groups"]
    except Exception:  # a state torch will not load safely: the Trainer's own load will say so
        return None
    if missing := sorted(set(optimizer.param_groups[0]) - set(saved[0] if saved else {})):
        return recipe.problem("training.optim", f"cannot resume from {state.parent}: its optimizer state "
                              f"has no '{missing[0]}', which optim '{optim}' needs (another optimizer saved "
                              "it)", "set training.optim back as that run had it, or train afresh in another "
                              "training.output_dir")
    return None


def scheduler_problem(recipe: Recipe, args) -> Problem | None:
    """The learning-rate scheduler, built as the Trainer builds it at its first step, on a one-parameter
    optimizer: a name that needs ``lr_scheduler_kwargs`` (cosine_with_min_lr: min_lr) fails now."""
    import torch
    from transformers import get_scheduler

    steps = args.max_steps if args.max_steps > 0 else 100
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate or 1.0)
    try:
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(steps),
                      num_training_steps=steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError) as err:
        return recipe.problem("training.lr_scheduler_kwargs", first_line(err, 200),
                              f"set what {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)} "
                              "needs in training.lr_scheduler_kwargs")
    return None
