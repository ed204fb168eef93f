"""A path written with a leading ``~`` names the home folder wherever a path is read: in a recipe (no shell ever
sees it) and in a ``--flag=~/x`` argument (a shell expands ``~`` only at the start of a word). Before, the model
was taken for a Hub id, the tokenizer passed validate and failed train, and output_dir wrote a folder named "~"
in the working directory."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import QUICKSTART, REPO
from lora_ns.config import load_recipe
from lora_ns.errors import run_cli

QUICK = ["training.max_steps=1", "training.save_strategy=no", "training.eval_strategy=no",
         "training.eval_on_start=false", "dataset.val_split=null", "dataset.max_samples=16"]


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llama):
    """HOME is a fresh folder holding a model and a data file; the commands run from another folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    shutil.copytree(tiny_llama, home / "models" / "tiny")
    shutil.copy(REPO / "lora_ns" / "samples" / "gsm8k.jsonl", home / "data.jsonl")
    (home / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


def test_recipe_paths_under_the_home_folder_validate_and_train(home, capsys):
    from lora_ns.train import main as train_main
    from lora_ns.validate.__main__ import main as validate_main

    paths = ["model.name_or_path=~/models/tiny", "model.tokenizer_name_or_path=~/models/tiny",
             "dataset.path=~/data.jsonl", "training.output_dir=~/out"]
    assert validate_main([str(QUICKSTART), "--no-data", *QUICK, *paths]) == 0, capsys.readouterr().err
    assert train_main([str(QUICKSTART), *QUICK, *paths]) == 0, capsys.readouterr().err
    assert (home / "out" / "adapter_model.safetensors").is_file()
    assert not (home.parent / "work" / "~").exists()  # TrainingArguments' literal "~" folder
    recipe = load_recipe(QUICKSTART, ["model.chat_template=~/t.jinja", "peft.init_from=~/out",
                                      "dataset.val_split=~/data.jsonl"])
    assert (recipe.model.chat_template, recipe.peft.init_from, recipe.dataset.val_split) == (
        str(home / "t.jinja"), str(home / "out"), str(home / "data.jsonl"))


def test_command_flags_written_with_an_equals_sign_expand_the_home_folder(home):
    from lora_ns.evaluate import make_parser as evaluate_parser
    from lora_ns.infer import make_parser as infer_parser
    from lora_ns.merge import make_parser as merge_parser
    from lora_ns.preprocess.cli import main as preprocess_main

    (home / "raw").mkdir()
    (home / "raw" / "a.txt").write_text("a paragraph of text\n")
    assert preprocess_main(["--raw-dir=~/raw", "--out-file=~/corpus.txt"]) == 0
    assert (home / "corpus.txt").read_text() == "a paragraph of text\n"
    merge = merge_parser().parse_args(["--adapter=~/out", "--output=~/merged"])
    assert (merge.adapter, merge.output) == (str(home / "out"), str(home / "merged"))
    infer = infer_parser().parse_args(["--model=~/out", "--input-file=~/p.txt", "--output-file=~/o.jsonl"])
    assert (infer.model, infer.input_file, infer.output_file) == tuple(
        str(home / name) for name in ("out", "p.txt", "o.jsonl"))
    infer = infer_parser().parse_args(["--model=builtin:tiny-llama", "--prompt=~/not a path"])
    assert infer.prompt == "~/not a path"  # text is left as typed
    evaluate = evaluate_parser().parse_args(["--adapter=~/out", "--output-dir=~/eval"])
    assert (evaluate.adapter, evaluate.output_dir) == (str(home / "out"), str(home / "eval"))


@pytest.mark.parametrize("override", ["training.output_dir=$SCRATCH/run", "dataset.path=${HOME}/data.jsonl",
                                      "model.name_or_path=$HOME/models/tiny", "peft.init_from=$RUNS/first"])
def test_a_shell_variable_in_a_recipe_path_is_refused_not_made_a_folder(home, override, capsys):
    from lora_ns.train import main as train_main
    from lora_ns.validate.__main__ import main as validate_main

    field = override.split("=")[0]
    for prog, main in (("lora_ns.validate", validate_main), ("lora_ns.train", train_main)):
        assert run_cli(prog, lambda: main([str(QUICKSTART), *QUICK, override])) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f" {field}: " in err[0] and "holds a shell variable" in err[0], err
        assert f"set it on the command line, where the shell expands it: {override}" in err[0]
    assert not any(p.name.startswith("$") for p in (home.parent / "work").rglob("*"))


def test_a_dollar_in_text_fields_is_text(home, capsys):
    from lora_ns.validate.__main__ import main as validate_main

    template = "{% for m in messages %}{{ m['content'] }} costs $5\n{% endfor %}"
    assert validate_main([str(QUICKSTART), "--no-data", f"model.chat_template={template}",
                          "dataset.system_prompt=Prices in $USD"]) == 0, capsys.readouterr().err


def test_relative_local_paths_are_recorded_absolute_so_later_commands_run_from_anywhere(home, capsys,
                                                                                      monkeypatch):
    """adapter_config.json named its base "models/tiny" and the saved recipe its data "data.jsonl": infer, merge
    and evaluate run from another folder could not find either (the base was then tried as a Hub id)."""
    from lora_ns.evaluate import main as evaluate_main
    from lora_ns.infer import main as infer_main
    from lora_ns.train import main as train_main

    work = home.parent / "work"
    shutil.copytree(home / "models" / "tiny", work / "models" / "tiny")
    shutil.copy(home / "data.jsonl", work / "data.jsonl")
    assert train_main([str(QUICKSTART), *QUICK, "model.name_or_path=models/tiny", "dataset.path=data.jsonl",
                       "training.output_dir=run"]) == 0, capsys.readouterr().err
    saved = json.loads((work / "run" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(work / "models" / "tiny")
    monkeypatch.chdir(home)
    run = str(work / "run")
    assert run_cli("lora_ns.infer", lambda: infer_main(["--model", run, "--prompt", "hi", "--max-new-tokens",
                                                        "2"])) == 0, capsys.readouterr().err
    assert run_cli("lora_ns.evaluate", lambda: evaluate_main(["--adapter", run, "--split", "train", "--limit", "2",
                                                              "--max-new-tokens", "2", "--no-progress"])) == 0, \
        capsys.readouterr().err
