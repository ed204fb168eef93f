"""The output folder of a run: fresh, interrupted (which checkpoint resumes it, and whether this recipe can
load that checkpoint), or finished (refused unless ``overwrite_output_dir``); shared by validate and train.
And the adapter a run leaves, as infer, merge and evaluate read it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora_ns.adapters import PROJECTION_NOT_SAVED
from lora_ns.config import Recipe
from lora_ns.errors import Problem, UserError, fail, first_line
from lora_ns.fileio import unwritable

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's adapter files
RECIPE_FILE = "recipe.yaml"  # the resolved recipe, written by lora_ns.train beside the weights
FINISHED_MARKER = "run_summary.json"  # written last by lora_ns.train
# Trainer writes weights, optimizer, scheduler and RNG state first and this file last: a checkpoint without it
# was cut off mid-save.
COMPLETE_MARKER = "trainer_state.json"


def is_finished(output_dir: str | Path) -> bool:
    return (Path(output_dir) / FINISHED_MARKER).exists()


def saved_recipe_file(folder: str | Path) -> Path | None:
    """The recipe training saved for the weights in `folder`: beside them or, for a checkpoint-<step> folder
    (which holds no copy), in the run's output_dir above it."""
    folder = Path(folder)
    run = folder.parent if checkpoint_step(folder) is not None else None
    return next((f / RECIPE_FILE for f in (folder, run) if f and (f / RECIPE_FILE).is_file()), None)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder's name, else None."""
    step = folder.name.removeprefix("checkpoint-")
    return int(step) if step != folder.name and step.isdigit() else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<step>`` folders, oldest step first (by number: 10 comes after 9). Not transformers'
    sort_checkpoints: validate's output-dir check runs without importing torch."""
    steps = {p: checkpoint_step(p) for p in Path(output_dir).glob("checkpoint-*") if p.is_dir()}
    return sorted((p for p, step in steps.items() if step is not None), key=steps.__getitem__)


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
        what = "a lora_ns run cut off as it saved (no run_summary.json, no checkpoint)" if RECIPE_FILE in \
            files else "files that are not a lora_ns run"
        return recipe.problem(name, f"{out} already holds {what} ({shown}); training would overwrite them",
                              "choose a new or empty output_dir, or set training.overwrite_output_dir: true")
    return None


def finished_run_fix(output_dir: str | Path) -> str:
    """What to do about a finished run in the output_dir: the fix names its last checkpoint to go on from."""
    last = last_checkpoint(output_dir, quiet=True)
    further = f" (to train it further: raise max_steps there, resume_from_checkpoint: {last})" if last else ""
    return f"choose another output_dir{further}, or set training.overwrite_output_dir: true"


def guard_output_dir(recipe: Recipe) -> None:
    """Refuse an unusable output_dir, or a finished run unless the recipe allows overwriting it."""
    if problem := output_dir_problem(recipe):
        raise UserError(problem)
    out = Path(recipe.output_dir)
    if not is_finished(out):
        return
    if not recipe.training.get("overwrite_output_dir"):
        raise UserError(recipe.problem("training.output_dir", f"{out} already holds a finished run",
                                       finished_run_fix(out)))


@contextmanager
def one_writer(recipe: Recipe) -> Iterator[None]:
    """One training writes an output_dir at a time: the same command launched twice (a second terminal, a job
    requeued while the first still runs) resumed from the first one's checkpoints as it wrote them. An OS lock
    on the folder, dropped however the process ends; the main process takes it (no fcntl: not checked)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    out = Path(recipe.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # after the set-up's output_dir checks
    folder = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(recipe.problem("training.output_dir", f"another training is writing {out} now",
                                           "wait for it to end (or stop it), or set another output_dir")
                            ) from None
        except OSError:  # a file system without locks (some network mounts): train unguarded, as before
            pass
        yield
    finally:
        os.close(folder)
        if created and not any(out.iterdir()):  # a run stopped before writing leaves no empty folder
            out.rmdir()


def clear_finished_run(recipe: Recipe) -> None:
    """Overwriting a finished run (overwrite_output_dir): its marker and checkpoints go, so an interrupted
    new run resumes itself, not the old one; but only once every set-up check has passed (a recipe refused
    later keeps the old run), and never the checkpoint this run resumes from."""
    out, keep = Path(recipe.output_dir), wanted_checkpoint(recipe)
    if not is_finished(out) or os.environ.get("RANK", "0") != "0":  # other ranks: after the data barrier
        return
    say(f"overwriting the finished run in {out}")
    for folder in checkpoints(out):
        if keep in (None, "auto") or not Path(keep).exists() or not folder.samefile(keep):
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


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    resave = "re-save the adapter, or point at the training output_dir that holds it"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise fail(str(path), "", f"not a readable adapter config ({first_line(err)})", resave)
    if not isinstance(config, dict) or not config.get("peft_type"):
        raise fail(str(path), "peft_type", "missing: not a peft adapter config", resave)
    from peft import PeftType

    if str(config["peft_type"]) not in PeftType.__members__:
        raise fail(str(path), "peft_type", f"{config['peft_type']} is no adapter type this peft knows",
                   f"upgrade peft (pip install -U peft), or {resave}")
    return config


def adapter_weights_defect(folder: Path) -> str | None:
    """Why `folder` holds no whole safetensors adapter weights (a pickle, which can run code, is never
    loaded), or None."""
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        return safetensors_defect(weights)
    return "not found" + " (only a pickle adapter_model.bin, which lora_ns does not load)" * \
        weights.with_suffix(".bin").is_file()


def check_adapter(folder: Path) -> dict[str, Any]:
    """The adapter's config, once its weights are known to be whole safetensors."""
    config = read_adapter_config(folder)
    if why := adapter_weights_defect(folder):
        raise fail(str(folder / ADAPTER_WEIGHTS), "", why, "re-save the adapter as safetensors "
                   "(save_pretrained), or copy the whole training output_dir again")
    return config


def checkpoint_defect(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from: no trainer_state.json, or a weights, optimizer or
    scheduler file that is not whole. Reads headers and zip indexes only, never unpickles."""
    try:
        json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {COMPLETE_MARKER} (cut off mid-save)"
    engine_saved = any(folder.glob("global_step*")) or any(folder.glob("pytorch_model_fsdp*"))  # their own
    if not engine_saved and not any(folder.glob("*.safetensors")):  # the Trainer's "no valid checkpoint"
        return "no weights (adapter_model.safetensors or model.safetensors)"
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
    folder, adapter = Path(checkpoint or ""), hasattr(model, "peft_config")
    if checkpoint is None or not folder.is_dir():
        return None
    saved_config: dict = {}
    if adapter:
        config = folder / ADAPTER_CONFIG
        saved_config = json.loads(config.read_text()) if config.is_file() else {}
        if problem := unloadable(recipe, checkpoint, saved_config):
            return problem
        ours, files = adapter_shapes(model), [folder / ADAPTER_WEIGHTS]
    else:
        ours = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
        files = sorted(folder.glob("model*.safetensors"))
    if why := shapes_differ(ours, files, adapter):
        return recipe.problem("peft" if adapter else "model.name_or_path", f"cannot resume from "
                              f"{checkpoint}: it was saved with {why}", "set the recipe back as that run had "
                              "it, or train afresh in another training.output_dir")
    return adapter and base_model_problem(recipe, checkpoint, saved_config, model) or None


def adapter_shapes(model) -> dict[str, list[int]]:
    """The shapes of what peft saves of `model`'s adapter, as its files name them."""
    from peft import get_peft_model_state_dict

    # in inference mode peft takes a prompt encoder's embedding as it is (what a checkpoint loads into)
    # instead of running the encoder and copying its output off the device, which a meta model cannot
    config = model.peft_config[model.active_adapter]
    training, config.inference_mode = config.inference_mode, True
    try:
        return {name: list(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}
    finally:
        config.inference_mode = training


def shapes_differ(ours: dict[str, list[int]], files: list[Path], adapter: bool) -> str | None:
    """What in the saved `files` does not fit the shapes `ours` (read from the safetensors headers), or None;
    an adapter's tensors must also be the same set (other target modules)."""
    from safetensors import safe_open

    saved: dict[str, list[int]] = {}
    for file in (f for f in files if f.is_file()):
        with safe_open(file, "pt") as weights:
            saved.update({name: list(weights.get_slice(name).get_shape()) for name in weights.keys()})
    if differ := [name for name in sorted(saved.keys() & ours.keys()) if saved[name] != ours[name]]:
        return f"{differ[0]} of shape {saved[differ[0]]}, this recipe builds {ours[differ[0]]}"
    if adapter and saved and saved.keys() != ours.keys():
        name = min(saved.keys() ^ ours.keys())
        return f"{name} {'but this recipe has none' if name in saved else 'missing'} (other target modules)"
    return None


def unloadable(recipe: Recipe, checkpoint: str, saved_config: dict) -> Problem | None:
    """An adapter checkpoint the Trainer cannot load back into the adapter it trains, whatever the recipe."""
    if saved_config.get("rank_pattern"):
        why = ("peft saves AdaLoRA checkpoints pruned to the ranks it allocated, which the Trainer cannot "
               "load back into the full-rank adapter it trains")
        fix = f"go on from its weights in a new output_dir with peft.init_from: {checkpoint} (steps and " \
              "optimizer start afresh)"
    elif saved_config.get("prefix_projection"):
        why, fix = PROJECTION_NOT_SAVED, "train afresh in another output_dir"
    else:
        return None
    return recipe.problem("peft.method", f"cannot resume from {checkpoint}: {why}",
                          f"{fix}, or set training.resume_from_checkpoint: none")


def base_model_problem(recipe: Recipe, checkpoint: str, saved_config: dict, model) -> Problem | None:
    """A warning when the checkpoint's adapter was trained on another base model with the same shapes:
    resuming would go on training it on this one. Not an error: a hub id and a local copy of the same
    model have different names."""
    saved = saved_config.get("base_model_name_or_path")
    ours = next(iter(model.peft_config.values())).base_model_name_or_path
    if not saved or not ours or os.path.realpath(saved) == os.path.realpath(ours):
        return None
    return recipe.problem("model.name_or_path", f"{checkpoint} was trained on {saved}, this recipe's model "
                          f"is {ours}: resuming goes on training that adapter on another base", "set the "
                          "model back, or train afresh in another training.output_dir (fine if both are one "
                          "model)", severity="warning")


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
