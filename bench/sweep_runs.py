"""What a spoiled training output does to the commands run after training: a task is trained two steps
(a checkpoint each step) once, then for each defect a copy of its output folder is spoiled one way (the
adapter's weights missing or cut short, its config not JSON or naming a missing base, the saved recipe
broken, a checkpoint's optimizer or trainer state missing, ...) and taken through infer, merge, evaluate,
a run continuing it (`peft.init_from`) or resuming the checkpoint.

    python bench/sweep_runs.py                  # every case (~10 minutes on 2 CPU cores)
    python bench/sweep_runs.py seq_cls          # one task's

Each step is `ok`, `refused` (a one-line error, exit 2) or `crashed` (a traceback: a check to add).
`bench/sweep_after.py` takes healthy outputs of every method through the same commands.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from lora_ns import evaluate, infer, merge, train  # noqa: E402
from sweep_after import PROMPT, step  # noqa: E402  (bench/ is the script's folder)
from sweep_combos import base  # noqa: E402
from sweep_fields import tally  # noqa: E402
from sweep_models import cut, edit_json  # noqa: E402

TASKS = ("causal_lm", "seq_cls", "dpo")
ADAPTER, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def unlink(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / n).unlink() for n in names if (folder / n).exists()] and None


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text, encoding="utf-8") and None


def adapter_config(**change) -> Callable[[Path], None]:
    def edit(config: dict) -> None:
        for key, value in change.items():
            config.pop(key, None) if value is None else config.update({key: value})
    return lambda folder: edit_json(folder, CONFIG, edit)


def pickled(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / ADAPTER), folder / "adapter_model.bin")
    (folder / ADAPTER).unlink()


# defects of the output folder (the adapter the commands load) and of its last checkpoint (what resumes)
OUTPUT: dict[str, Callable[[Path], None]] = {
    "clean": lambda folder: None,
    "no_adapter_weights": unlink(ADAPTER),
    "cut_adapter_weights": lambda folder: cut(folder / ADAPTER),
    "pickle_adapter_weights": pickled,
    "adapter_config_not_json": write(CONFIG, "{\"peft_type\": "),
    "no_adapter_config": unlink(CONFIG),
    "no_base_named": adapter_config(base_model_name_or_path=None),
    "base_gone": adapter_config(base_model_name_or_path="/nonexistent/base"),
    "unknown_peft_type": adapter_config(peft_type="FOO"),
    "rank_edited": adapter_config(r=2),
    "no_recipe": unlink("recipe.yaml"),
    "recipe_not_yaml": write("recipe.yaml", "task: [causal_lm\n"),
    "no_tokenizer": unlink("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"),
}
CHECKPOINT: dict[str, Callable[[Path], None]] = {
    "clean": lambda folder: None,
    "no_trainer_state": unlink("trainer_state.json"),
    "trainer_state_not_json": write("trainer_state.json", "{"),
    "no_optimizer": unlink("optimizer.pt"),
    "cut_optimizer": lambda folder: cut(folder / "optimizer.pt"),
    "no_scheduler": unlink("scheduler.pt"),
    "no_rng_state": lambda folder: [p.unlink() for p in folder.glob("rng_state*.pth")] and None,
    "no_adapter_weights": unlink(ADAPTER),
    "cut_adapter_weights": lambda folder: cut(folder / ADAPTER),
}


def trained(task: str, work: Path) -> Path:
    """The recipe file of a two-step run of `task` with a checkpoint each step, trained in `work`."""
    recipe = base(task, "lora", str(work / "run"))
    recipe["training"].update(save_strategy="steps", save_steps=1)
    recipe["dataset"]["val_split"] = 0.25
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    kind, why = step(train, [str(work / "recipe.yaml")])
    if kind != "ok":
        raise SystemExit(f"{task}: the clean run failed: {why}")
    return work / "recipe.yaml"


def output_steps(recipe: Path, run: Path, task: str) -> list[tuple[str, object, list[str]]]:
    ask = PROMPT.get(task, ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4", "--greedy"])
    again = [str(recipe), "training.max_steps=3", f"training.output_dir={run.parent / 'next'}"]
    return [("infer", infer, ["--model", str(run), *ask, "--no-progress"]),
            ("merge", merge, ["--adapter", str(run), "--output", str(run.parent / "merged")]),
            ("evaluate", evaluate, ["--adapter", str(run), "--limit", "4", "--max-new-tokens", "4",
                                    "--no-progress", "--output-dir", str(run.parent / "eval")]),
            ("init_from", train, [*again, f"peft.init_from={run}"])]


def checkpoint_steps(recipe: Path, run: Path, task: str) -> list[tuple[str, object, list[str]]]:
    ask = PROMPT.get(task, ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4", "--greedy"])
    again = [str(recipe), "training.max_steps=3", f"training.output_dir={run.parent / 'next'}"]
    return [("resume", train, [*again, f"training.resume_from_checkpoint={run}/checkpoint-2"]),
            ("infer checkpoint", infer, ["--model", f"{run}/checkpoint-2", *ask, "--no-progress"])]


def results(chosen: list[str]) -> Iterator[tuple[str, str, str]]:
    cases = [("output", name, spoil, output_steps) for name, spoil in OUTPUT.items()] + \
        [("checkpoint", name, spoil, checkpoint_steps) for name, spoil in CHECKPOINT.items()]
    for task in (t for t in TASKS if not chosen or t in chosen):
        with tempfile.TemporaryDirectory() as work:
            recipe = trained(task, Path(work))
            for where, name, spoil, steps in cases:
                with tempfile.TemporaryDirectory() as case:
                    run = Path(shutil.copytree(Path(work) / "run", Path(case) / "run"))
                    spoil(run if where == "output" else run / "checkpoint-2")
                    for label, module, argv in steps(recipe, run, task):
                        yield f"{task:9} {where:10} {name:24} {label:16}", *step(module, argv)


def main(chosen: list[str]) -> None:
    tally("sweep_runs", results(chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
