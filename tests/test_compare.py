"""Base vs tuned side by side (`lora-ns compare`, infer's --compare mode): a questions file to JSON, and
interactive mode fed through stdin."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_ns import cli
from lora_ns.errors import run_cli

from conftest import QUICKSTART, make_adapter
QUESTIONS = ["Ben has 33 stickers and gives away 27. How many stickers are left?", "What is 2+2?"]


def main(argv: list[str]) -> int:
    """`lora-ns compare ARGV`, with compare's own flag names (--tuned, --questions-file, --output)."""
    return cli.main(["compare", *argv])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama) -> Path:
    """A saved adapter (random LoRA B, so it answers differently from the base)."""
    from lora_ns.config import load_recipe

    out = tmp_path_factory.mktemp("compare") / "out"
    return make_adapter(out, load_recipe(QUICKSTART, [f"training.output_dir={out}", "peft.init_lora_weights=false"]))


def test_questions_file_to_json(tuned, tmp_path, capsys):
    from lora_ns.inference import generate, load

    questions = tmp_path / "q.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "side_by_side.json"
    argv = ["--tuned", str(tuned), "--questions-file", str(questions), "--output", str(out), "--max-new-tokens", "8"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert [r["prompt"] for r in rows] == QUESTIONS and all(set(r) == {"prompt", "base", "tuned"} for r in rows)

    adapter = load(str(tuned))
    base = load("builtin:tiny-llama")
    options = dict(recipe=adapter.recipe, max_new_tokens=8, progress=False)
    assert [r["tuned"] for r in rows] == generate(adapter, QUESTIONS, **options)
    assert [r["base"] for r in rows] == generate(base, QUESTIONS, **options)
    assert any(r["base"] != r["tuned"] for r in rows)

    capsys.readouterr()
    assert run_cli("lora_ns.compare", lambda: main(argv)) == 2
    assert "already exists" in capsys.readouterr().err


def test_interactive_reads_prompts_until_eof(tuned, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n"))
    assert main(["--tuned", str(tuned), "--interactive", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 2 and out.count("[base]") == 2 and out.count("[tuned]") == 2
    assert out.index(QUESTIONS[0]) < out.index(QUESTIONS[1])

    argv = ["--tuned", str(tuned), "--interactive", "--output", "side_by_side.json"]
    assert main(argv) == 2  # nothing to write a file from: one line, before any model loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-ns compare: error:") and "--interactive" in err and err.count("\n") == 0


@pytest.mark.parametrize("module", ["merge", "infer", "evaluate"])
def test_help_is_fast_and_imports_no_torch(module):
    code = (f"import sys\nfrom lora_ns.{module} import make_parser\nmake_parser().format_help()\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
