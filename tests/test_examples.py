"""examples/: quick_start.py end to end, the train_<task>.sh launchers, and the gradio demo's wiring."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from conftest import REPO

EXAMPLES = REPO / "examples"
TASKS = ["glue_mrpc", "metamath_qa", "gsm8k", "code_feedback", "alpaca_zh", "quickstart"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def env() -> dict[str, str]:
    """The scripts call `accelerate` and `python` by name: put this interpreter's bin folder first (CI
    runs the suite as .venv/bin/python without activating the venv)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(REPO), "PATH": path}


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """Run examples/quick_start.py once (shortened) from a scratch folder; (process, output dir)."""
    work = tmp_path_factory.mktemp("quick_start")
    out = work / "out"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quick_start.py"), f"training.output_dir={out}", "training.max_steps=12",
         "training.logging_steps=2", "training.eval_steps=6", "training.eval_on_start=true"],
        cwd=work, env=env(), capture_output=True, text=True, timeout=300)
    return proc, out


def test_quick_start_trains_answers_and_reports(quick_start):
    proc, out = quick_start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()
    png = (out / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    summary = (out / "summary.txt").read_text(encoding="utf-8")
    assert f"adapter:          {out}" in summary and "steps:            12" in summary
    # The example really learns: the held-out loss, on the same rows each time, before training (an untrained
    # run's value: lr 0 keeps it exactly) and after 12 steps. 12 steps at 5e-3 take it from ~6.96 to ~6.59;
    # 0.1 nats is far above float noise (~1e-6) and well below what is learned.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert [step for step, _ in evals] == [0, 6, 12], evals
    assert evals[-1][1] < evals[0][1] - 0.1, evals
    stdout = proc.stdout
    assert summary in stdout  # the summary is printed at the end of training
    assert re.search(r"^question: +\S", stdout, re.M) and re.search(r"^model: ", stdout, re.M)
    # before and after, the final answer evaluate would score (or that there is none)
    verdicts = re.findall(r"^ +-> (no final answer|final answer \S+: (right|wrong \(reference \S+\)))$", stdout, re.M)
    assert len(verdicts) == 2, stdout[-1500:]
    assert f"loss curve: {out / 'loss_curve.png'}" in stdout
    ending = stdout.rstrip().splitlines()[-4:]  # the output ends with what to do next, real paths in it
    assert ending[0] == "Next:" and all(f"python -m lora_ns.{cmd} " in line
                                        for cmd, line in zip(("infer", "evaluate", "merge"), ending[1:])), ending


def test_quick_start_refuses_to_overwrite_a_finished_run(quick_start):
    proc, out = quick_start
    again = subprocess.run([sys.executable, str(EXAMPLES / "quick_start.py"), f"training.output_dir={out}"],
                           cwd=out.parent, env=env(), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "already holds a finished run" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("task", TASKS)
def test_train_script_per_recipe(task):
    script = EXAMPLES / f"train_{task}.sh"
    text = script.read_text()
    assert (REPO / "recipes" / f"{task}.yaml").is_file()
    assert os.access(script, os.X_OK)
    assert f'accelerate launch -m lora_ns.train recipes/{task}.yaml "$@"' in text
    assert re.search(r"^# Hardware: .*(GPU|CPU)", text, re.M)  # says what it needs
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_train_quickstart_script_runs_under_accelerate(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "train_quickstart.sh"), f"training.output_dir={out}", "training.max_steps=2",
         "dataset.val_split=null", 'training.eval_strategy="no"', "training.eval_on_start=false",
         "training.logging_steps=1"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()


# --- the gradio demo (gradio itself is an optional extra, not installed for the tests) ------------

def load_demo():
    """examples/chat_demo.py as a module (it is an example script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chat_demo", REPO / "examples" / "chat_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    from lora_ns.errors import run_cli

    demo = load_demo()

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` raise ImportError
    assert run_cli(demo.PROG, lambda: demo.main(["--adapter", "outputs/none"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "package 'gradio' is not installed" in err[0] and "pip install 'lora_ns[demo]'" in err[0]


def test_demo_serves_a_chat_on_the_adapter(quick_start, monkeypatch):
    """With a stand-in gradio, the demo builds a ChatInterface whose function answers with the adapter."""
    demo = load_demo()

    proc, out = quick_start
    assert proc.returncode == 0
    built = {}

    class ChatInterface:
        def __init__(self, fn, **kwargs):
            built["fn"], built["kwargs"] = fn, kwargs

        def launch(self, **kwargs):
            built["launch"] = kwargs

    monkeypatch.setitem(sys.modules, "gradio", types.SimpleNamespace(ChatInterface=ChatInterface))
    assert demo.main(["--adapter", str(out), "--port", "7999", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert built["launch"] == {"server_name": "127.0.0.1", "server_port": 7999, "share": False}
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    answer = built["fn"]("How many apples?", history)
    assert isinstance(answer, str)
    assert demo.history_messages([("hi", "hello")]) == history  # gradio's older pair format
