"""What passes validate and then fails in training, for combinations rather than single fields: every peft
method with every task, then settings users put together (streaming with a hold-out, packing with chat
data, preference trainers with AdaLoRA or prompt tuning, optimizers, schedulers, loggers, ...). Each case is
validated with train's own set-up and, when that passes, trained two steps on the tiny models.

    python bench/sweep_combos.py          # every case (~15 minutes on 2 CPU cores)
    python bench/sweep_combos.py 24 39    # some of them, by number

A case is `refused` (validate said it), `trained`, `train-refused` (train's one-line net, after validate
passed) or `crashed` (a traceback: a check to add). `bench/sweep_fields.py` sweeps single fields.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_ns.config import parse_recipe  # noqa: E402
from sweep_fields import tally, verdict  # noqa: E402  (bench/ is the script's folder)

# task -> (sample, formatter); "chat" is causal_lm on multi-turn data
DATA = {"causal_lm": ("gsm8k", "gsm8k"), "chat": ("code_feedback", "code_feedback"), "cpt": ("text", "text"),
        "seq_cls": ("glue_mrpc", "glue_mrpc"), "dpo": ("preference", "preference"), "kto": ("kto", "kto"),
        "orpo": ("ultrafeedback", "ultrafeedback"), "grpo": ("gsm8k", "gsm8k_prompt")}
PEFT = {"lora": {"r": 8, "lora_alpha": 16}, "adalora": {"total_step": 2}, "ia3": {},
        "prefix_tuning": {"num_virtual_tokens": 4}, "prompt_tuning": {"num_virtual_tokens": 4}, "full": {}}
EVAL = {"dataset": {"val_split": 0.25}, "training": {"eval_strategy": "steps", "eval_steps": 1}}

SCENARIOS = [
    ("causal_lm", "lora", {"dataset": {"streaming": True, "val_split": 0.25},
                           "training": {"eval_strategy": "steps", "eval_steps": 1}}),
    ("causal_lm", "lora", {"dataset": {"streaming": True}, "training": {"packing": True}}),
    *[(task, "lora", {"dataset": {"streaming": True}}) for task in ("seq_cls", "dpo", "kto", "grpo", "cpt")],
    *[(task, "lora", EVAL) for task in ("causal_lm", "seq_cls", "cpt", "dpo", "kto", "orpo", "grpo")],
    ("causal_lm", "lora", {"model": {"dtype": "fp16"}}),
    ("causal_lm", "lora", {"model": {"dtype": "bf16"}, "training": {"fp16": True}}),
    ("causal_lm", "lora", {"model": {"chat_template": "chatml"}}),
    ("chat", "lora", {"dataset": {"prompt_template": "Q: {prompt}\nA:"}}),
    ("chat", "lora", {"training": {"packing": True}}),
    ("causal_lm", "lora", {"training": {"padding_free": True}}),
    ("causal_lm", "lora", {"training": {"packing": True, "eval_strategy": "steps", "eval_steps": 1},
                           "dataset": {"val_split": 0.25}}),
    *[(task, method, {"training": {"gradient_checkpointing": True}})
      for task, method in (("causal_lm", "ia3"), ("causal_lm", "prompt_tuning"), ("causal_lm", "adalora"),
                           ("seq_cls", "lora"), ("dpo", "lora"), ("grpo", "lora"))],
    ("causal_lm", "lora", {"training": {"load_best_model_at_end": True, "eval_strategy": "steps",
                                        "eval_steps": 1, "save_strategy": "steps", "save_steps": 1,
                                        "save_total_limit": 1}, "dataset": {"val_split": 0.25}}),
    ("causal_lm", "lora", {"training": {"train_sampling_strategy": "group_by_length"},
                           "dataset": {"streaming": True}}),
    ("dpo", "lora", {"training": {"precompute_ref_log_probs": True}}),
    ("dpo", "lora", {"training": {"padding_free": True}}),
    ("grpo", "adalora", {"training": {"beta": 0.1}}),
    ("grpo", "lora", {"training": {"beta": 0.1}}),
    *[(task, "lora", {"dataset": {"system_prompt": "Be brief."}}) for task in ("dpo", "grpo", "cpt")],
    *[(task, "lora", {"dataset": {"prompt_template": "Q: {prompt}\nA:"}}) for task in ("dpo", "kto", "grpo")],
    ("causal_lm", "lora", {"peft": {"layers_to_transform": [0]}}),
    ("causal_lm", "lora", {"peft": {"modules_to_save": ["lm_head"]}}),
    ("causal_lm", "lora", {"peft": {"init_lora_weights": "pissa"}}),
    *[("causal_lm", "lora", {"training": {"optim": optim}})
      for optim in ("adafactor", "sgd", "lion_32bit", "paged_adamw_8bit", "galore_adamw")],
    ("causal_lm", "lora", {"training": {"lr_scheduler_type": "reduce_lr_on_plateau"}}),
    ("causal_lm", "lora", {"training": {"report_to": "tensorboard"}}),
    ("causal_lm", "lora", {"training": {"max_steps": -1, "num_train_epochs": 0.1}}),
    ("causal_lm", "lora", {"training": {"dataloader_num_workers": 2}, "dataset": {"streaming": True}}),
    ("seq_cls", "lora", {"model": {"num_labels": 3}}),
    ("causal_lm", "lora", {"model": {"name_or_path": "builtin:tiny-qwen2"}}),
    ("grpo", "lora", {"model": {"name_or_path": "builtin:tiny-qwen2"}}),
]
CASES = [(task, method, {}) for task in DATA for method in PEFT] + SCENARIOS


def base(task: str, method: str, out: str) -> dict:
    sample, formatter = DATA[task]
    task = "causal_lm" if task == "chat" else task
    training = {"output_dir": out, "max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no",
                "logging_steps": 1, "report_to": "none", "max_length": 128}
    model = {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"}
    peft = {"method": method, **PEFT[method]}
    if task == "grpo":
        training.update(reward_funcs=["gsm8k"], num_generations=2, max_completion_length=8)
    if task == "seq_cls":
        model.update(name_or_path="builtin:tiny-bert", num_labels=2)
        peft.update({"target_modules": ["query", "value"]} if method in ("lora", "adalora") else {})
    if task in ("grpo", "seq_cls"):
        del training["max_length"]
    return {"task": task, "model": model, "peft": peft, "training": training,
            "dataset": {"path": f"sample:{sample}", "formatter": formatter, "max_samples": 16}}


def merged(into: dict, change: dict) -> dict:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merged(into[key], value)
        else:
            into[key] = value
    return into


def outcome(task: str, method: str, change: dict) -> tuple[str, str]:
    return verdict(lambda out: parse_recipe(merged(base(task, method, f"{out}/run"), copy.deepcopy(change)),
                                            "case.yaml"))


def results(chosen: list[str]) -> Iterator[tuple[str, str, str]]:
    for number, (task, method, change) in enumerate(CASES):
        if not chosen or str(number) in chosen:
            columns = f"{number:3} {task:9} {method:13} {json.dumps(change)[:70]:70}"
            yield columns, *outcome(task, method, change)


def main(chosen: list[str]) -> None:
    tally("sweep_combos", results(chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
