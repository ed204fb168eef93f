"""lora_ns.train: defaults, loss masks, tokenizer set-up, the run's output folder, the CLI end to end, and the
end-of-training report (loss-curve PNG and summary.txt, written atomically, with the next commands)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns import run_record
from lora_ns.config import parse_recipe
from lora_ns.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def recipe_dict(out, formatter: str = "gsm8k", path: str = "sample:gsm8k", **training) -> dict:
    return {
        "task": "causal_lm",
        "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "peft": {"method": "lora", "r": 4},
        "dataset": {"path": path, "formatter": formatter, "max_samples": 8},
        "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256,
                     "report_to": "none", **training},
    }


def test_lora_ns_defaults_and_recipe_values_win(tmp_path):
    import torch

    from lora_ns.setup import training_arguments

    args = training_arguments(parse_recipe(recipe_dict(tmp_path, report_to="tensorboard")))
    assert args.save_strategy == "steps" and args.save_total_limit == 2  # resumable by default
    assert args.report_to == ["tensorboard"] and args.use_cpu is not torch.cuda.is_available() and not args.bf16
    assert args.gradient_checkpointing is False and args.eval_strategy == "no"
    assert args.completion_only_loss is True and args.packing is False
    args = training_arguments(parse_recipe(recipe_dict(tmp_path, save_strategy=False, gradient_checkpointing=True,
                                                        completion_only_loss=False, logging_steps=3)))
    assert args.save_strategy == "no"  # YAML's bare `no` arrives as False
    assert args.gradient_checkpointing and args.logging_steps == 3
    assert args.completion_only_loss is False


def test_packing_defaults_on_with_flash_attention_only(tmp_path):
    from lora_ns.setup import training_arguments

    flash = recipe_dict(tmp_path)
    flash["model"]["attn_implementation"] = "flash_attention_2"
    args = training_arguments(parse_recipe(flash))
    assert args.packing is True and args.packing_strategy == "bfd"
    flash["training"]["packing"] = False  # the recipe wins
    assert training_arguments(parse_recipe(flash)).packing is False


def test_chat_rows_default_to_assistant_only_loss(tmp_path):
    from lora_ns.setup import training_arguments

    chat = recipe_dict(tmp_path, formatter="code_feedback", path="sample:code_feedback")
    assert training_arguments(parse_recipe(chat)).assistant_only_loss is True
    chat["training"]["assistant_only_loss"] = False
    assert training_arguments(parse_recipe(chat)).assistant_only_loss is False


def labelled_share(recipe: dict) -> float:
    """Share of real (non-pad) tokens that carry a label in the first collated training batch."""
    from lora_ns.setup import setup
    from lora_ns.train import prepare

    recipe = parse_recipe(recipe)
    trainer, _, _ = prepare(recipe, setup(recipe, dry_run=False).args)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    real = batch["attention_mask"].bool()
    return float((batch["labels"][real] != -100).float().mean())


@pytest.mark.parametrize("formatter, path, switch", [
    ("gsm8k", "sample:gsm8k", "completion_only_loss"),
    ("code_feedback", "sample:code_feedback", "assistant_only_loss"),
])
def test_loss_on_the_answer_only_by_default_everything_when_asked(formatter, path, switch, tmp_path, tiny_llama):
    answer_only = labelled_share(recipe_dict(tmp_path / "a", formatter, path))
    everything = labelled_share(recipe_dict(tmp_path / "b", formatter, path, **{switch: False}))
    assert 0.05 < answer_only < 0.95
    assert everything == 1.0


def test_tokenizer_gets_pad_token_and_recipe_chat_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    from lora_ns.model import load_tokenizer

    bare = AutoTokenizer.from_pretrained(tiny_llama)
    bare.pad_token, bare.chat_template = None, None
    bare.save_pretrained(tmp_path / "tok")
    recipe = recipe_dict(tmp_path)
    recipe["model"].update(tokenizer_name_or_path=str(tmp_path / "tok"), chat_template="{{ messages[0]['content'] }}")
    tokenizer = load_tokenizer(parse_recipe(recipe))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"
    replaced = load_tokenizer(parse_recipe({**recipe, "model": {**recipe["model"], "tokenizer_name_or_path": None}}))
    assert replaced.pad_token == "<|endoftext|>"  # the tokenizer's own pad token is kept
    assert replaced.chat_template == "{{ messages[0]['content'] }}"  # the recipe's template replaces its own


def test_missing_flash_attention_stops_before_loading(tmp_path, tiny_llama, capsys):
    import importlib.util

    from lora_ns.errors import run_cli
    from lora_ns.model import load_model
    from lora_ns.train import main

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    data = recipe_dict(tmp_path / "out")
    data["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
        load_model(parse_recipe(data))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    assert run_cli("lora_ns.train", lambda: main([str(tmp_path / "r.yaml")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora_ns.train: error: ") and "flash-attn" in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_hub_tokenizer_or_model_that_does_not_load_at_train_is_one_line(tmp_path, capsys, tiny_llama):
    """Validate can only warn about a Hub id it cannot reach (offline here); train, which must load it, printed
    huggingface_hub's OSError traceback."""
    from lora_ns.errors import run_cli
    from lora_ns.train import main

    base = [str(REPO / "recipes" / "quickstart.yaml"), f"training.output_dir={tmp_path / 'out'}"]
    for field in ("model.tokenizer_name_or_path", "model.name_or_path"):
        assert run_cli("lora_ns.train", lambda: main([*base, f"{field}=some-org/not-cached-xyz"])) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line or "Traceback" in line]
        assert len(err) == 1 and f"{field}: cannot load the " in err[0] and "HF cache" in err[0], err


def test_a_run_that_trains_no_step_is_an_error_not_a_finished_run(tmp_path, capsys):
    """6 rows packed, batches of 8 with dataloader_drop_last: not one batch. The run said "Training finished",
    saved the untrained adapter and marked the run finished (exit 0). (Unpacked, validate counts the rows.)"""
    from lora_ns.errors import run_cli
    from lora_ns.train import main

    out = tmp_path / "out"
    argv = [str(REPO / "recipes" / "quickstart.yaml"), f"training.output_dir={out}", "dataset.max_samples=6",
            "dataset.val_split=null", "training.eval_strategy=no", "training.eval_on_start=false",
            "training.max_steps=2", "training.per_device_train_batch_size=8", "training.dataloader_drop_last=true",
            "training.packing=true"]
    assert run_cli("lora_ns.train", lambda: main(argv)) == 2
    err = capsys.readouterr().err
    assert "training.per_device_train_batch_size: no training step ran: the data gave no full batch" in err
    assert not (out / "run_summary.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_assistant_only_loss_on_plain_text_rows_is_refused_before_the_weights_load(tmp_path):
    """A prompt_template sends prompt/completion rows out as plain text; SFTTrainer refused
    assistant_only_loss on them as it started, with a traceback, after validate had passed. validate says it;
    a refusal of the trainer's own that validate does not repeat is one line naming the field."""
    from lora_ns.config import load_recipe
    from lora_ns.setup import Checks, setup
    from lora_ns.train import run_training

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [
        "training.assistant_only_loss=true", f"training.output_dir={tmp_path / 'out'}", "training.max_steps=1"])
    recipe.dataset.prompt_template = "Q: {prompt}\nA:\n"
    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    assert "training.assistant_only_loss: needs chat rows, and these go out as plain text" in str(err.value)
    with pytest.raises(UserError) as err:  # past validate's data checks: the trainer's own refusal
        run_training(recipe, Checks(data=False))
    (problem,) = err.value.problems
    assert problem.field == "training.assistant_only_loss" and "not conversational" in problem.message
    assert not (tmp_path / "out" / "run_summary.json").exists()


def test_saved_recipe_never_holds_tokens(tmp_path):
    from lora_ns.run_record import saved_recipe

    text = saved_recipe(parse_recipe(recipe_dict(tmp_path, hub_token="hf_SECRETsecret", eos_token="<|im_end|>")))
    assert "hf_SECRET" not in text and "hub_token" not in text
    assert yaml.safe_load(text)["training"]["eos_token"] == "<|im_end|>"  # not a credential: kept


def test_cli_trains_end_to_end_and_writes_the_run_folder(tmp_path, tiny_llama):
    """One subprocess run of ``python -m lora_ns.train`` with overrides, as a user would."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe_dict("outputs/run", report_to="tensorboard")))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "lora_ns.train", "r.yaml", "training.max_steps=3", "--training.logging_steps", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "outputs" / "run"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml",
                 "versions.json", "trainer_state.json", "run_summary.json"):
        assert (out / name).is_file(), name
    weights = [p.name for p in out.rglob("*") if p.name.startswith(("adapter_model", "model", "pytorch_model"))]
    assert weights and all(name.endswith(".safetensors") for name in weights), weights
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["method"] == "lora" and summary["trainable_params"] > 0
    assert json.loads((out / "versions.json").read_text())["peft"]
    saved = (out / "recipe.yaml").read_text()
    assert yaml.safe_load(saved)["training"]["max_steps"] == 3  # the overrides are in the saved recipe
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # tensorboard logged
    assert "trainable params:" in done.stdout
    assert (out / "run_summary.json").stat().st_mtime_ns >= (out / "recipe.yaml").stat().st_mtime_ns


def test_saved_recipe_pins_auto_dtypes(tmp_path):
    from lora_ns.config import Recipe
    from lora_ns.run_record import saved_recipe

    data = recipe_dict(tmp_path, hub_token="hf_secret_value")
    data["model"]["dtype"] = "auto"
    data["quantization"] = {"load_in_4bit": True}
    data["peft"]["method"] = "qlora"
    recipe = Recipe.model_validate(data)  # schema only: the secret rule would refuse this recipe
    import torch

    saved = yaml.safe_load(saved_recipe(recipe))
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert saved["model"]["dtype"] == expected
    assert saved["quantization"]["bnb_4bit_compute_dtype"] == expected
    assert "hf_secret_value" not in saved_recipe(recipe)


# --- the report: loss curve and summary.txt ---------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY = [
    {"loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 5},
    {"loss": 2.1, "grad_norm": 0.9, "learning_rate": 1e-3, "epoch": 1.0, "step": 10},
    {"eval_loss": 2.3, "eval_runtime": 0.1, "epoch": 1.0, "step": 10},
    {"loss": 1.7, "grad_norm": 0.8, "learning_rate": 1e-3, "epoch": 1.5, "step": 15},
    {"eval_loss": 1.9, "eval_runtime": 0.1, "epoch": 2.0, "step": 20},
    {"train_runtime": 3.2, "train_loss": 2.1, "epoch": 2.0, "step": 20},
]
SUMMARY = {"steps": 20, "seconds": 83.4, "first_loss": 2.5, "last_loss": 1.7, "train_loss": 2.1,
           "trainable_params": 32768, "total_params": 201664}


@pytest.fixture
def adapter_dir(tmp_path):
    out = tmp_path / "my run"  # a space: commands must quote it
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")
    return out


def test_loss_points_split_train_and_eval():
    points, evals = run_record.loss_points(HISTORY)
    assert points == [(5, 2.5), (10, 2.1), (15, 1.7)]
    assert evals == [(10, 2.3), (20, 1.9)]


def test_write_report_draws_a_png_and_writes_the_summary(adapter_dir, capsys):
    run_record.write_report(HISTORY, adapter_dir, SUMMARY)
    png = (adapter_dir / "loss_curve.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    text = (adapter_dir / "summary.txt").read_text(encoding="utf-8")
    assert capsys.readouterr().out == text  # printed as well as saved
    assert f"adapter:          {adapter_dir}" in text
    assert "steps:            20" in text and "1 min 23 s" in text
    assert "2.5000 -> 1.7000" in text and "1.9000 at step 20" in text
    assert "32,768 of 201,664 (16.25%)" in text
    assert str(adapter_dir / "loss_curve.png") in text
    # nothing but the two files: no temp files left behind
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "loss_curve.png", "summary.txt"]


def test_next_commands_use_the_real_paths_quoted(adapter_dir):
    commands = dict(run_record.next_commands(adapter_dir))
    assert set(commands) == {"try it", "evaluate it", "merge it"}
    infer = shlex.split(commands["try it"])
    assert infer[:3] == ["python", "-m", "lora_ns.infer"] and infer[infer.index("--model") + 1] == str(adapter_dir)
    evaluate = shlex.split(commands["evaluate it"])
    assert evaluate[3] == str(adapter_dir / "recipe.yaml")
    assert evaluate[evaluate.index("--adapter") + 1] == str(adapter_dir)
    merge = shlex.split(commands["merge it"])
    assert merge[merge.index("--adapter") + 1] == str(adapter_dir)
    assert merge[merge.index("--output") + 1] == str(adapter_dir.parent / "my run-merged")


def test_evaluate_is_suggested_with_rows_it_can_read(adapter_dir):
    """Without a held-out split in the run's recipe, evaluate stops at once ("the recipe has no eval split"):
    the suggested command then names a file of held-out rows to fill in."""
    from conftest import QUICKSTART

    data = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    (adapter_dir / "recipe.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    assert data["dataset"]["val_split"] and dict(run_record.next_commands(adapter_dir))["evaluate it"].endswith(
        f"--adapter {shlex.quote(str(adapter_dir))}")
    del data["dataset"]["val_split"]
    (adapter_dir / "recipe.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    assert dict(run_record.next_commands(adapter_dir))["evaluate it"].endswith("--data-file HELD_OUT.jsonl")


def test_a_full_fine_tune_is_called_a_model_and_has_no_merge_step(tmp_path, capsys):
    run_record.write_report(HISTORY, tmp_path, SUMMARY)
    text = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert f"model:            {tmp_path}" in text
    assert "lora_ns.merge" not in text and f"--model {tmp_path}" in text


def test_no_logged_loss_means_no_png_and_says_why(adapter_dir, capsys):
    history = [{"train_runtime": 1.0, "train_loss": 2.0, "epoch": 1.0, "step": 3}]
    run_record.write_report(history, adapter_dir, {"steps": 3, "seconds": 1.0, "train_loss": 2.0})
    assert not (adapter_dir / "loss_curve.png").exists()
    text = (adapter_dir / "summary.txt").read_text(encoding="utf-8")
    assert "not drawn: no loss was logged" in text and "training.logging_steps" in text
    assert "no evaluation ran" in text
    assert "train loss:       2.0000 (the run's mean: no step logged" in text  # was "- -> -"


def test_a_failing_plot_leaves_no_partial_png_and_the_summary_still_lands(adapter_dir, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fh, **kwargs):
        fh.write(PNG_SIGNATURE + b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    run_record.write_report(HISTORY, adapter_dir, SUMMARY)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "summary.txt"]
    captured = capsys.readouterr()
    assert "loss curve not drawn: OSError: disk full" in captured.err
    assert "not drawn: OSError: disk full" in (adapter_dir / "summary.txt").read_text(encoding="utf-8")


def test_the_report_replaces_an_earlier_one(adapter_dir, capsys):
    (adapter_dir / "summary.txt").write_text("old summary")
    (adapter_dir / "loss_curve.png").write_bytes(b"old")
    run_record.write_report(HISTORY, adapter_dir, SUMMARY)
    assert (adapter_dir / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "old summary" not in (adapter_dir / "summary.txt").read_text(encoding="utf-8")


def test_without_matplotlib_the_summary_says_how_to_get_the_curve(adapter_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` fails as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    run_record.write_report(HISTORY, adapter_dir, SUMMARY)
    text = (adapter_dir / "summary.txt").read_text(encoding="utf-8")
    assert "pip install 'lora_ns[plot]'" in text and not (adapter_dir / "loss_curve.png").exists()
    assert "pip install 'lora_ns[plot]'" in capsys.readouterr().err


def test_a_second_training_into_an_output_dir_being_written_is_refused(tmp_path, capsys, tiny_llama):
    """The same command launched twice (a second terminal, a job requeued while the first still runs) resumed
    from the first run's checkpoints while it was writing them: the folder is locked while a training runs."""
    import fcntl

    from lora_ns.errors import run_cli
    from lora_ns.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-2").mkdir()  # the first training's, mid-run
    args = [str(REPO / "recipes" / "quickstart.yaml"), f"training.output_dir={out}", "training.max_steps=1",
            "training.eval_strategy=no", "training.eval_on_start=false", "dataset.val_split=null"]
    first = os.open(out, os.O_RDONLY)
    fcntl.flock(first, fcntl.LOCK_EX)  # what the first training holds until it ends
    try:
        assert run_cli("lora_ns.train", lambda: main(args)) == 2
    finally:
        os.close(first)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].endswith(f" training.output_dir: another training is writing {out} now — "
                                             "wait for it to end (or stop it), or set another output_dir"), err
    assert [p.name for p in out.iterdir()] == ["checkpoint-2"]  # nothing written, nothing resumed
    (out / "checkpoint-2").rmdir()
    assert run_cli("lora_ns.train", lambda: main(args)) == 0  # the lock went with the first training


def test_a_file_system_without_locks_trains_unguarded(tmp_path, capsys, monkeypatch, tiny_llama):
    """Some network mounts refuse flock (ENOLCK): training goes on as before the lock, no traceback."""
    import errno
    import fcntl
    import stat

    from lora_ns.errors import run_cli
    from lora_ns.train import main

    real = fcntl.flock

    def no_folder_locks(fd, operation):  # datasets' file locks still work: only the output folder's fails
        if stat.S_ISDIR(os.fstat(fd if isinstance(fd, int) else fd.fileno()).st_mode):
            raise OSError(errno.ENOLCK, "No locks available")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_folder_locks)
    args = [str(REPO / "recipes" / "quickstart.yaml"), f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=1", "training.eval_strategy=no", "training.eval_on_start=false",
            "dataset.val_split=null"]
    assert run_cli("lora_ns.train", lambda: main(args)) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "run_summary.json").is_file()
