"""Resuming: a run killed with SIGKILL mid-way and started again trains only the remaining steps and ends
with the same adapter as a run that was never interrupted; the checkpoint helpers pick the right folder;
save_total_limit is honoured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_ns.config import parse_recipe
from lora_ns.errors import UserError
from lora_ns.checkpoints import (COMPLETE_MARKER, FINISHED_MARKER, clear_finished_run, guard_output_dir, last_checkpoint,
                                 resume_target)
from lora_ns.setup import Checks, setup

from conftest import REPO

STEPS, SAVE_EVERY, KEEP = 10, 2, 2

RECIPE = f"""\
task: causal_lm
model:
  name_or_path: builtin:tiny-llama
  dtype: fp32
peft:
  method: lora
  r: 8
  lora_alpha: 16
  lora_dropout: 0.0
dataset:
  path: sample:gsm8k
  formatter: gsm8k
  max_samples: {STEPS * 2}
training:
  max_steps: {STEPS}
  per_device_train_batch_size: 2
  learning_rate: 1.0e-2
  lr_scheduler_type: linear
  warmup_steps: 2
  logging_steps: 1
  save_strategy: steps
  save_steps: {SAVE_EVERY}
  save_total_limit: {KEEP}
  max_length: 128
  seed: 0
  dataloader_num_workers: 0
"""


def recipe(output_dir: Path, **training) -> object:
    return parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                         "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
                         "training": {"output_dir": str(output_dir), **training}}, "r.yaml")


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # empty but whole
    if complete:
        (folder / COMPLETE_MARKER).write_text("{}")
    return folder


# --- the helpers ----------------------------------------------------------------------------------

def test_last_checkpoint_is_the_newest_complete_one(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 9)
    newest = fake_checkpoint(tmp_path, 10)  # 10 > 9 by number, though "checkpoint-10" < "checkpoint-9" as text
    fake_checkpoint(tmp_path, 12, complete=False)  # killed while saving
    (tmp_path / "checkpoint-final").mkdir()
    assert last_checkpoint(tmp_path) == str(newest)


def test_resume_auto_explicit_and_off(tmp_path, capsys):
    out = tmp_path / "run"
    assert resume_target(recipe(out)) is None  # fresh run: nothing to resume
    fake_checkpoint(out, 2)
    four = fake_checkpoint(out, 4)
    assert resume_target(recipe(out)) == str(four)  # "auto" is the default
    assert f"resuming from {four}" in capsys.readouterr().err
    two = str(out / "checkpoint-2")
    assert resume_target(recipe(out, resume_from_checkpoint=two)) == two
    assert resume_target(recipe(out, resume_from_checkpoint="no")) is None


@pytest.mark.parametrize("wanted, words", [("nowhere/checkpoint-7", "not found"), ("partial", COMPLETE_MARKER),
                                           ("weightless", "no weights")])  # the Trainer's "no valid checkpoint"
def test_resume_from_a_bad_path_is_a_user_error(tmp_path, wanted, words):
    """setup's rules (validate and train alike) refuse it before anything loads."""
    fake_checkpoint(tmp_path, 0, complete=False).rename(tmp_path / "partial")
    (fake_checkpoint(tmp_path, 1) / "adapter_model.safetensors").unlink()
    (tmp_path / "checkpoint-1").rename(tmp_path / "weightless")
    with pytest.raises(UserError) as err:
        setup(recipe(tmp_path / "run", resume_from_checkpoint=str(tmp_path / wanted)), dry_run=False,
              checks=Checks(data=False, model=False))
    (problem,) = err.value.problems
    assert problem.field == "training.resume_from_checkpoint" and words in problem.message


def test_finished_run_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, 4)
    guard_output_dir(recipe(out))  # interrupted: allowed, it will be resumed
    (out / FINISHED_MARKER).write_text("{}")
    with pytest.raises(UserError) as err:
        guard_output_dir(recipe(out))
    assert err.value.problems[0].field == "training.output_dir"
    assert "overwrite_output_dir" in err.value.problems[0].fix
    # the fix says how to train the run further; following it is accepted and resumes from that checkpoint
    assert f"raise max_steps there, resume_from_checkpoint: {out / 'checkpoint-4'}" in err.value.problems[0].fix
    further = recipe(tmp_path / "further", resume_from_checkpoint=str(out / "checkpoint-4"), max_steps=6)
    guard_output_dir(further)
    assert resume_target(further) == str(out / "checkpoint-4")
    overwrite = recipe(out, overwrite_output_dir=True)
    assert resume_target(overwrite) is None  # starts over rather than "resuming" the finished run
    guard_output_dir(overwrite)
    # ...then, once every set-up check has passed, clears the old run's marker and checkpoints, so an interrupted
    # new run resumes itself, not the old one
    assert (out / FINISHED_MARKER).exists()
    clear_finished_run(overwrite)
    assert not (out / FINISHED_MARKER).exists() and last_checkpoint(out) is None


def test_overwriting_a_finished_run_keeps_it_until_the_checks_pass_and_keeps_the_resumed_checkpoint(tmp_path):
    """The old run was deleted first: a recipe refused a moment later lost it for nothing, and one resuming from
    a checkpoint inside it lost that checkpoint, then stopped on 'not found'."""
    out = tmp_path / "run"
    for step in (2, 4):
        fake_checkpoint(out, step)
    (out / FINISHED_MARKER).write_text("{}")
    with pytest.raises(UserError):  # a later check refuses the recipe: the finished run stays whole
        setup(recipe(out, overwrite_output_dir=True, weight_decay=-1.0), dry_run=False,
              checks=Checks(data=False, model=False))
    assert (out / FINISHED_MARKER).exists() and len(list(out.glob("checkpoint-*"))) == 2
    further = recipe(out, overwrite_output_dir=True, resume_from_checkpoint=str(out / "checkpoint-4"))
    setup(further, dry_run=False, checks=Checks(data=False, model=False))
    assert not (out / FINISHED_MARKER).exists() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert resume_target(further) == str(out / "checkpoint-4")


# --- the real thing: SIGKILL, resume, compare ---------------------------------------------------------

# `python -m lora_ns.train` with one test-only TrainerCallback added (lora_ns itself is untouched):
# "hold" writes the step of the first checkpoint to a marker file once it is saved, then sleeps until
# killed, so the run cannot race past the kill however busy the machine; "record" appends every step the
# process itself trains, so the test sees whether a resumed run trained only the remaining steps.
WRAPPER = """\
import os, sys, time
from transformers import TrainerCallback
import lora_ns.train as train
from lora_ns.errors import run_cli

MODE, FILE = sys.argv.pop(1), sys.argv.pop(1)

class Probe(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if MODE == "record":
            with open(FILE, "a", encoding="utf-8") as f:
                f.write(f"{state.global_step}\\n")

    def on_save(self, args, state, control, **kwargs):
        if MODE == "hold":
            with open(FILE + ".tmp", "w", encoding="utf-8") as f:
                f.write(str(state.global_step))
            os.replace(FILE + ".tmp", FILE)
            time.sleep(3600)

build = train.build_trainer

def build_trainer(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(Probe())
    return trainer

train.build_trainer = build_trainer
sys.exit(run_cli(train.PROG, lambda: train.main(sys.argv[1:])))
"""


def start(recipe_path: Path, out: Path, env: dict, probe: tuple[str, Path] | None = None) -> subprocess.Popen:
    """lora_ns.train on the recipe; with `probe` (mode, file), through WRAPPER."""
    command = ["-m", "lora_ns.train"] if probe is None else ["-c", WRAPPER, probe[0], str(probe[1])]
    return subprocess.Popen([sys.executable, *command, str(recipe_path), f"training.output_dir={out}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    stdout, stderr = proc.communicate(timeout=420)
    assert proc.returncode == 0, f"{what} failed:\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return stderr


def kill_when_held(proc: subprocess.Popen, marker: Path, timeout: float = 300) -> int:
    """Wait (generously) until the run holds after its first checkpoint, SIGKILL it; the checkpoint's step."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail("the run ended before it wrote a checkpoint:\n" + proc.communicate()[1][-3000:])
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            pytest.fail(f"no checkpoint within {timeout} s")
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return int(marker.read_text(encoding="utf-8"))


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_killed_run_resumes_to_the_same_weights(tmp_path, tiny_llama):
    import torch

    recipe_path = tmp_path / "resume.yaml"
    recipe_path.write_text(RECIPE, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"), "CUDA_VISIBLE_DEVICES": ""}
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    held, trained = tmp_path / "held", tmp_path / "trained_steps"

    straight = start(recipe_path, reference, env)  # runs alongside the one that gets killed
    killed_at = kill_when_held(start(recipe_path, interrupted, env, ("hold", held)), held)
    assert killed_at == SAVE_EVERY and not (interrupted / FINISHED_MARKER).exists()
    resume_from = last_checkpoint(interrupted)
    assert resume_from == str(interrupted / f"checkpoint-{killed_at}")

    resumed_log = finish(start(recipe_path, interrupted, env, ("record", trained)), "the resumed run")
    finish(straight, "the uninterrupted run")
    assert f"resuming from {resume_from}" in resumed_log
    # The resumed process trained only the remaining steps, continuing the step count (a run that said
    # "resuming" but started over from step 0 would reach the same weights with the same seed).
    steps = [int(line) for line in trained.read_text(encoding="utf-8").split()]
    assert steps == list(range(killed_at + 1, STEPS + 1)), steps
    history = json.loads((interrupted / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, STEPS + 1))  # one log per step, no repeats

    want, got = adapter(reference), adapter(interrupted)
    assert want.keys() == got.keys() and want
    # Same seed, data order, optimizer and RNG state restored: the runs differ only by fp32 rounding in another
    # process (~1e-7 relative on weights of order 1e-1). A resume that restarts or drops the optimizer moves
    # the LoRA weights by ~lr = 1e-2 per step, far above this bound.
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    trained_weights = adapter(reference)
    assert any(t.abs().sum() > 0 for n, t in trained_weights.items() if "lora_B" in n), "lora_B never left zero"

    for out in (reference, interrupted):  # save_total_limit: only the newest KEEP checkpoints survive
        kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        assert kept == list(range(STEPS - SAVE_EVERY * (KEEP - 1), STEPS + 1, SAVE_EVERY)), f"{out.name}: {kept}"


def test_a_changed_adapter_or_optimizer_is_refused_before_resuming(tmp_path, tiny_llama, tiny_qwen2):
    """An interrupted run whose recipe then changed its adapter (r, target modules) or optimizer would load
    the checkpoint and stop (size mismatch; optimizer groups; sgd's step reading 'momentum' from adamw's saved
    groups): setup refuses it first, validate and train alike, naming the checkpoint and what differs; the
    unchanged recipe still resumes, and a changed scheduler is no problem (its state loads as is)."""
    from lora_ns.train import train

    def lora_recipe(peft: dict = {}, **training):
        run = recipe(tmp_path / "run", max_steps=2, save_steps=1, report_to="none", max_length=64,
                     per_device_train_batch_size=2, **training)
        return parse_recipe({**run.model_dump(exclude_unset=True),
                             "peft": {"method": "lora", "r": 4, **peft}}, "r.yaml")

    train(lora_recipe())
    (tmp_path / "run" / FINISHED_MARKER).unlink()  # as if killed before the end
    setup(lora_recipe(), dry_run=True)  # unchanged: resumes
    setup(lora_recipe(lr_scheduler_type="cosine"), dry_run=True)
    other_base = lora_recipe()
    other_base.model.name_or_path = "builtin:tiny-qwen2"  # same adapter shapes, another model
    for dry_run in (True, False):
        (warning,) = [n for n in setup(other_base, dry_run=dry_run).notes if n.severity == "warning"]
        assert warning.field == "model.name_or_path" and "checkpoint-2 was trained on" in warning.message
        assert "tiny-llama" in warning.message and "tiny-qwen2" in warning.message, warning
    for change, field, words in [
            (lora_recipe({"r": 8}), "peft", "lora_A.weight of shape [4, 128], this recipe builds [8, 128]"),
            (lora_recipe({"target_modules": ["q_proj"]}), "peft", "but this recipe has none (other target modules)"),
            (lora_recipe(optim="sgd"), "training.optim", "optimizer state has no 'dampening'")]:
        for dry_run in (True, False):
            with pytest.raises(UserError) as err:
                setup(change, dry_run=dry_run)
            (problem,) = err.value.problems
            assert problem.field == field and "cannot resume from" in problem.message, problem
            assert words in problem.message and "checkpoint-2" in problem.message


PROMPT_TUNING = {"peft": {"method": "prompt_tuning", "num_virtual_tokens": 4}}
CLASSIFIER = {"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert", "num_labels": 2},
              "dataset": {"path": "sample:glue_mrpc", "formatter": "glue_mrpc"}, "training": {"max_length": None}}


@pytest.mark.parametrize("sections, changed, words", [
    # these crashed as the set-up read a meta-device prompt encoder, so they never resumed
    (PROMPT_TUNING, {}, None),
    ({**CLASSIFIER, **PROMPT_TUNING}, {}, None),  # its head was then "other target modules"
    (PROMPT_TUNING, {"num_virtual_tokens": 6}, "prompt_embeddings of shape [4, 64], this recipe builds [6, 64]"),
    # these loaded the weights, then stopped on a size mismatch: the checkpoint cannot be resumed at all
    ({"peft": {"method": "adalora", "total_step": 2}}, {}, "pruned to the ranks it allocated"),
    ({"peft": {"method": "prefix_tuning", "num_virtual_tokens": 4, "prefix_projection": True,
               "encoder_hidden_size": 8}}, {}, "not the projection that trains"),
])
def test_resuming_an_adapter_of_each_kind(tmp_path, capsys, tiny_llama, sections, changed, words):
    """An interrupted prompt-tuning run resumes to the step it was asked for; a checkpoint the Trainer
    cannot load back is refused by the set-up, validate and train alike, before any weights load."""
    from lora_ns.train import train

    def peft_recipe(peft_changes: dict, max_steps: int):
        run = recipe(tmp_path / "run", max_steps=max_steps, save_steps=1, report_to="none", max_length=64,
                     per_device_train_batch_size=2).model_dump(exclude_unset=True)
        for name, section in sections.items():
            run[name] = {**run[name], **section} if isinstance(section, dict) and name != "peft" else section
        return parse_recipe({**run, "peft": {**sections["peft"], **peft_changes}}, "r.yaml")

    train(peft_recipe({}, 2))
    (tmp_path / "run" / FINISHED_MARKER).unlink()  # as if killed before the end
    again = peft_recipe(changed, 3)
    if words is None:
        capsys.readouterr()
        train(again)
        assert f"resuming from {tmp_path / 'run' / 'checkpoint-2'}" in capsys.readouterr().err
        state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
        assert state["global_step"] == 3
        return
    for dry_run in (True, False):
        with pytest.raises(UserError) as err:
            setup(again, dry_run=dry_run)
        (problem,) = err.value.problems
        assert "cannot resume from" in problem.message and words in problem.message, problem
