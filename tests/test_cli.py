"""The ``lora-ns`` console script: help, version, dispatch, exit codes and one-line errors."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
import types

import pytest

from conftest import REPO
from lora_ns import __version__, cli

ENV = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(REPO)}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_ns.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_console_script_points_at_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["lora-ns"].split(":")
    assert getattr(importlib.import_module(module), func) is cli.main


def test_help_lists_every_command():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lora-ns")
    for name in ("train", "validate", "merge", "infer", "evaluate", "compare", "preprocess"):
        assert f"\n  {name} " in proc.stdout


def test_version(capsys):
    assert cli.main(["--version"]) == 0  # argparse's version action exits 0; main returns that code
    assert capsys.readouterr().out.strip() == f"lora-ns {__version__}"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_subcommand_help_is_the_modules_own(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main([command, "--help"]) == 0
    via_cli = capsys.readouterr().out
    module = importlib.import_module(f"lora_ns.{cli.MODES.get(command, (command,))[0]}")  # compare: infer's
    assert callable(module.main)
    assert via_cli == module.make_parser().format_help()
    assert cli.main(["help", command]) == 0  # `lora-ns help X` == `lora-ns X --help`
    assert capsys.readouterr().out == via_cli


def test_subcommand_help_in_a_subprocess_matches_python_m():
    proc = run("validate", "--help")
    direct = subprocess.run([sys.executable, "-m", "lora_ns.validate", "--help"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert proc.returncode == direct.returncode == 0
    assert proc.stdout == direct.stdout and "usage:" in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"]])
def test_help_does_not_import_torch(args):
    heavy = "sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules)"
    code = f"import sys; from lora_ns.cli import main; rc = main({args!r}); print('HEAVY', rc, {heavy})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY 0 []"


def test_unknown_command_suggests_the_closest_one():
    proc = run("trian", "recipes/quickstart.yaml")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("lora-ns: error:") and "trian" in lines[0] and "did you mean 'train'?" in lines[0]


def test_unknown_command_without_a_close_match_lists_the_commands(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command" in err and "train, validate, merge" in err


def test_no_command_and_unknown_option_are_one_line_errors(capsys):
    assert cli.main([]) == 2
    assert "no command given" in capsys.readouterr().err
    assert cli.main(["--frobnicate"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--frobnicate" in err


def test_arguments_and_exit_code_pass_through(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    monkeypatch.setitem(sys.modules, "lora_ns.infer", types.SimpleNamespace(main=fake_main))
    assert cli.main(["infer", "--base", "a b", "x=1"]) == 3
    assert seen["argv"] == ["--base", "a b", "x=1"]
    assert cli.main(["compare", "--base", "a b"]) == 3  # a mode of infer
    assert seen["argv"] == ["--compare", "--base", "a b"]


def test_user_errors_of_a_command_print_one_line_with_its_name(in_tmp, capsys):
    assert cli.main(["validate", "missing.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.yaml" in err[0] and "recipe file not found" in err[0]


def test_argparse_errors_of_a_command_keep_their_code(capsys):
    assert cli.main(["train"]) == 2  # missing the recipe argument
    assert "recipe" in capsys.readouterr().err


def test_validate_through_the_cli(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["validate", "recipes/quickstart.yaml", "--no-model", "--no-data"]) == 0
    assert "OK recipes/quickstart.yaml" in capsys.readouterr().out


def test_a_command_missing_from_the_install_is_a_user_error(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "nosuchcommand", "not a real module")
    assert cli.main(["nosuchcommand"]) == 2
    assert "not available" in capsys.readouterr().err


TEARDOWN_PROBE = """import sys
from lora_ns.cli import main
class Teardown:
    def __del__(self):
        print("teardown", flush=True)
keep = Teardown()  # destroyed only by the interpreter's own teardown
sys.argv = ["lora-ns", *sys.argv[1:]]
sys.exit(main())
"""


@pytest.mark.parametrize("args, code, torn_down", [
    (["validate", "recipes/gsm8k.yaml", "--no-model", "--no-data"], 0, False),
    (["validate_config.py", "missing.yaml"], 2, False),  # the old script name too, and an error's code
    (["--version"], 0, True),  # other commands end as usual
])
def test_console_validate_skips_the_teardown_and_keeps_the_code(args, code, torn_down):
    """`lora-ns validate` ends like `python -m lora_ns.validate` (errors.exit_now): no ~3 s teardown."""
    run = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**ENV, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == code, run.stderr[-500:]
    assert ("teardown" in run.stdout) == torn_down


def test_messages_name_the_command_as_the_user_typed_it(capsys):
    """validate prints its own errors (it goes on to the next recipe with --all) and every command prints its
    warnings: under `lora-ns validate` they said `lora_ns.validate:`, beside run_cli's `lora-ns validate:`."""
    from lora_ns.validate.__main__ import main as validate_main

    recipe = str(REPO / "recipes" / "quickstart.yaml")
    bad = ["training.learning_rate=0", "training.max_length=0"]  # a warning and an error
    assert cli.main(["validate", recipe, "--no-model", "--no-data", *bad]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("lora-ns validate: ") for line in lines), lines
    assert cli.main(["validate", recipe, "--no-model", "--no-data", bad[0]]) == 0
    assert "lora-ns validate: warning: " in capsys.readouterr().err
    assert validate_main([recipe, "--no-model", "--no-data", *bad]) == 2  # python -m lora_ns.validate's name
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("lora_ns.validate: ") for line in lines), lines
