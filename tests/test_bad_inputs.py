"""The bad-input corpus (tests/bad_inputs/): every broken recipe, data file, override and accelerate config
gives a one-line error naming the file and the field, exits 2, prints no traceback and writes nothing.

Each ``tests/bad_inputs/*.yaml`` is one case; its leading comments say what to expect:

    # expect: training.learning_rate      the field (or, for whole-file errors, the words) the error names
    # file: data/x.jsonl:3                the file the error names, when not the recipe itself
    # args: --no-model training.x=1       extra command-line arguments ({repo} = the repository root)
    # run: train                          run `python -m lora_ns.train` (errors found only at train time)
    # needs: no-gpu                       skip where a GPU is visible

Data files, accelerate configs and a finished run the cases point at live beside them (data/,
finished_run/). Each case runs in a fresh copy of the corpus, which must be byte-for-byte unchanged after.
The cases are independent subprocesses, so they run a few at a time (one per CPU core).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
ERROR = re.compile(r"^lora_ns\.(validate|train): error: (?P<problem>.+)$")


@dataclass(frozen=True)
class Case:
    path: Path
    expect: str
    file: str
    args: list[str] = field(default_factory=list)
    command: str = "validate"
    needs: str = ""

    @property
    def name(self) -> str:
        return self.path.stem


def read_case(path: Path) -> Case:
    meta: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#\s*(expect|file|args|run|needs):\s*(.*\S)", line)
        if not line.startswith("#"):
            break
        if match:
            meta[match.group(1)] = match.group(2)
    assert "expect" in meta, f"{path.name}: the first comment lines need '# expect: <field>'"
    args = shlex.split(meta.get("args", "").replace("{repo}", str(REPO)))
    return Case(path, meta["expect"], meta.get("file", path.name), args, meta.get("run", "validate"),
                meta.get("needs", ""))


CASES = [read_case(p) for p in sorted(CORPUS.glob("*.yaml"))]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


@dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess
    work: Path
    changed: bool  # files written or changed in the working folder


def run_case(case: Case, tmp: Path) -> Outcome:
    work = tmp / "corpus"
    shutil.copytree(CORPUS, work)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(tmp / "hf_datasets_cache")}
    cmd = [sys.executable, "-m", f"lora_ns.{case.command}", case.path.name, *case.args]
    before = snapshot(work)
    result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(result, work, snapshot(work) != before)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, tiny_llama):
    """Start every selected case at once on a small pool; each test waits for its own."""
    wanted = {case.name for item in request.session.items if item.module is request.module
              and (case := getattr(getattr(item, "callspec", None), "params", {}).get("case"))}
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    futures: dict[str, Future] = {c.name: pool.submit(run_case, c, tmp_path_factory.mktemp(c.name))
                                  for c in CASES if c.name in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def check_one_line_errors(case: Case, result: subprocess.CompletedProcess) -> None:
    stderr = result.stderr
    assert result.returncode == 2, f"{case.name}: exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{case.name}: a traceback was printed\n{stderr[-3000:]}"
    problems = [m.group("problem") for line in stderr.splitlines() if (m := ERROR.match(line))]
    assert problems, f"{case.name}: no 'lora_ns.{case.command}: error:' line\n{stderr[-3000:]}"
    assert any(case.file in p and case.expect in p for p in problems), \
        f"{case.name}: no error line names both {case.file!r} and {case.expect!r}:\n" + "\n".join(problems)
    # One mistake, one line: the same file:line and field must not be reported twice.
    where = [": ".join(p.split(": ")[:2]) for p in problems]
    assert len(where) == len(set(where)), f"{case.name}: the same problem is reported twice:\n" + "\n".join(problems)


def test_corpus_is_large_enough():
    assert len(CASES) >= 30
    assert {c.command for c in CASES} == {"validate", "train"}
    assert len({c.expect for c in CASES}) >= 25, "cases should cover many different fields"


def check_case(case: Case, outcome: Outcome) -> None:
    assert not outcome.changed, f"{case.name}: files were written or changed in the working folder"
    check_one_line_errors(case, outcome.result)
    assert not (outcome.work / "outputs").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.command == "validate"], ids=lambda c: c.name)
def test_validate_rejects(case: Case, outcomes):
    check_case(case, outcomes[case.name].result())


@pytest.mark.parametrize("case", [c for c in CASES if c.command == "train"], ids=lambda c: c.name)
def test_train_rejects(case: Case, outcomes):
    if case.needs == "no-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("needs a machine without a GPU")
    check_case(case, outcomes[case.name].result())


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_recipe_file(command, in_tmp):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", f"lora_ns.{command}", "no_such_recipe.yaml"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"lora_ns.{command}: error: no_such_recipe.yaml: recipe file not found" in result.stderr
    assert list(in_tmp.iterdir()) == []
