"""Two-process DDP on the CPU (gloo) with the tiny model, launched the way a user would on GPUs:
``examples/train_multi_gpu.sh`` -> ``accelerate launch --multi_gpu --num_processes 2 -m lora_ns.train``.

A ``sitecustomize`` on PYTHONPATH records, per rank, every file opened for writing under the output
dir (Python's audit hook) and every dataset map that really ran (not loaded from the datasets cache),
so the test can tell which rank wrote and which rank tokenized, without touching lora_ns.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# SAMPLES = WORLD_SIZE x BATCH: every step trains on the same global batch (its rows split between the ranks),
# so the logged losses, averaged over the ranks, are comparable from step to step.
WORLD_SIZE, BATCH, STEPS = 2, 2, 4
SAMPLES = WORLD_SIZE * BATCH

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
  max_samples: {SAMPLES}
training:
  max_steps: {STEPS}
  per_device_train_batch_size: {BATCH}
  learning_rate: 1.0e-2
  lr_scheduler_type: constant
  logging_steps: 1
  save_strategy: steps
  save_steps: {STEPS}
  max_length: 128
  seed: 0
  dataloader_num_workers: 0
"""

TRACER = '''\
"""Test-only tracer (tests/test_distributed.py): per-rank log of writes under the output dir and of maps run."""
import functools, json, os, sys

_LOG, _OUT = os.environ.get("LORA_NS_TRACE_LOG"), os.environ.get("LORA_NS_TRACE_OUT")
if _LOG and _OUT and "RANK" in os.environ:  # only the ranks, not the launcher
    _RANK = os.environ["RANK"]
    _OUT = os.path.realpath(_OUT)

    def _record(kind, detail):
        with open(f"{_LOG}.rank{_RANK}", "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "detail": detail}) + "\\n")

    def _inside(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(_OUT)
        except (TypeError, ValueError):
            return False

    def _audit(event, args):
        if event == "open" and args and not isinstance(args[0], int) and _inside(args[0]):
            mode, flags = args[1], args[2] or 0
            if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                _record("write", os.fsdecode(args[0]))
        elif event in ("os.rename", "os.replace") and _inside(args[1]):
            _record("write", os.fsdecode(args[1]))

    _record("start", {"world_size": os.environ.get("WORLD_SIZE"), "argv": sys.argv})
    sys.addaudithook(_audit)

    import datasets.arrow_dataset as _ad

    _map_single = _ad.Dataset._map_single

    @functools.wraps(_map_single)
    def _traced(*args, **kwargs):
        _record("map", kwargs.get("new_fingerprint"))
        yield from _map_single(*args, **kwargs)

    _ad.Dataset._map_single = staticmethod(_traced)
'''


# A rendezvous port taken by another process between the launcher choosing it and binding it.
PORT_TAKEN = re.compile(r"EADDRINUSE|address already in use|another process is utilizing it", re.I)


def read_trace(log: Path, rank: int) -> list[dict]:
    path = Path(f"{log}.rank{rank}")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def launcher_env(**extra: str) -> dict[str, str]:
    """The environment examples/train_multi_gpu.sh needs to start WORLD_SIZE ranks on the CPU."""
    return {**os.environ, "PYTHON": sys.executable, "CPU_PROCESSES": str(WORLD_SIZE),
            "MAIN_PROCESS_PORT": "0",  # accelerate picks a free port itself, right before it starts the ranks
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def launch(tmp: Path) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """examples/train_multi_gpu.sh on a fresh folder: (output dir, trace log, the finished process)."""
    (tmp / "hooks").mkdir()
    (tmp / "hooks" / "sitecustomize.py").write_text(TRACER, encoding="utf-8")
    recipe = tmp / "ddp.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    out, log = tmp / "out", tmp / "trace"
    env = launcher_env(
        PYTHONPATH=os.pathsep.join([str(tmp / "hooks"), str(REPO), os.environ.get("PYTHONPATH", "")]),
        HF_DATASETS_CACHE=str(tmp / "hf_datasets_cache"),  # fresh: rank 0 must really tokenize
        LORA_NS_TRACE_LOG=str(log), LORA_NS_TRACE_OUT=str(out))
    result = subprocess.run(["bash", str(REPO / "examples" / "train_multi_gpu.sh"), str(recipe),
                             f"training.output_dir={out}"], cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=540)
    return out, log, result


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_llama):
    """One 2-rank run; the tests below each check one property of it."""
    for attempt in range(3):  # a new attempt only when the rendezvous port was taken under us
        tmp = tmp_path_factory.mktemp("ddp")
        out, log, result = launch(tmp)
        if result.returncode == 0 or not PORT_TAKEN.search(result.stderr):
            break
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    checkpoint = out / f"checkpoint-{STEPS}"
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return {"out": out, "checkpoint": checkpoint, "state": state, "log": log, "tmp": tmp, "result": result}


def test_two_ranks_trained_together(ddp_run):
    """Trainer saves one RNG state per process when it sees a process group of 2."""
    rng = sorted(p.name for p in ddp_run["checkpoint"].glob("rng_state*.pth"))
    assert rng == [f"rng_state_{r}.pth" for r in range(WORLD_SIZE)]
    for rank in range(WORLD_SIZE):
        starts = [e["detail"] for e in read_trace(ddp_run["log"], rank) if e["kind"] == "start"]
        assert len(starts) == 1 and starts[0]["world_size"] == str(WORLD_SIZE), f"rank {rank}: {starts}"


def test_data_is_split_between_ranks(ddp_run):
    """Each step consumes world_size x per-device batch rows: the epoch counter says how many were seen."""
    state = ddp_run["state"]
    assert state["global_step"] == STEPS
    seen = state["epoch"] * SAMPLES
    assert seen == pytest.approx(WORLD_SIZE * BATCH * STEPS)


def test_loss_goes_down(ddp_run):
    """The same global batch every step: lr 0 would log the same loss each step (up to float rounding in the
    reduction, ~1e-6); 4 steps at lr 1e-2 take ~0.3 nats off (6.95 -> 6.66), so 0.1 is a real margin."""
    losses = [e["loss"] for e in ddp_run["state"]["log_history"] if "loss" in e]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.1, losses


def test_only_rank_zero_writes(ddp_run):
    out = ddp_run["out"]
    assert len(list(out.rglob("adapter_model.safetensors"))) == 2  # the final adapter + the one checkpoint's
    assert (out / "adapter_model.safetensors").is_file() and (out / "run_summary.json").is_file()
    writes = {rank: [e["detail"] for e in read_trace(ddp_run["log"], rank) if e["kind"] == "write"]
              for rank in range(WORLD_SIZE)}
    assert any(w.endswith("run_summary.json") for w in writes[0]), "the tracer saw rank 0 write nothing"
    assert writes[1] == [], f"rank 1 wrote into the output dir: {writes[1]}"
    assert json.loads((out / "run_summary.json").read_text(encoding="utf-8"))["steps"] == STEPS


def test_tokenized_once(ddp_run):
    """Datasets are prepared on the main process first; the other rank finds every map in the cache."""
    maps = {rank: [e["detail"] for e in read_trace(ddp_run["log"], rank) if e["kind"] == "map"]
            for rank in range(WORLD_SIZE)}
    assert maps[0], "rank 0 ran no dataset map at all (was the datasets cache not fresh?)"
    assert maps[1] == [], f"rank 1 recomputed {len(maps[1])} dataset maps instead of reading rank 0's cache"


def launch_classifier(tmp_path: Path, peft: dict, dataset: dict) -> subprocess.CompletedProcess:
    """examples/train_multi_gpu.sh on a tiny-bert MRPC classifier, two steps, into tmp_path/out."""
    recipe = tmp_path / "classifier.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert", "num_labels": 2}, "peft": peft,
        "dataset": {"path": "sample:glue_mrpc", "formatter": "glue_mrpc", "max_samples": 8, **dataset},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                     "report_to": "none"}}), encoding="utf-8")
    return subprocess.run(["bash", str(REPO / "examples" / "train_multi_gpu.sh"), str(recipe)], cwd=tmp_path,
                          env=launcher_env(), capture_output=True, text=True, timeout=300)


def test_a_streamed_data_set_trains_on_two_ranks(tmp_path, tiny_bert):
    """accelerate's default for a stream (rank 0 reads, joins both ranks' batches, sends each its share)
    stopped at the first two batches that padded to different lengths: most real data."""
    result = launch_classifier(tmp_path, {"method": "lora", "target_modules": ["query", "value"]},
                               {"streaming": True})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "run_summary.json").read_text(encoding="utf-8"))["steps"] == 2


def test_a_recipe_the_model_check_refuses_stops_before_the_ranks_start(tmp_path, tiny_bert):
    """The script validated without data or model, so a recipe train's model check refuses started every rank,
    each printed the error, and the launcher ended in torch.distributed's traceback."""
    result = launch_classifier(tmp_path, {"method": "prefix_tuning", "num_virtual_tokens": 4}, {})
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("lora_ns.validate: error:") and "prefix" in errors[0], errors
    assert not (tmp_path / "out").exists()
