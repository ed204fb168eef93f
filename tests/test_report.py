"""End-of-training report: loss-curve PNG and summary.txt, written atomically, with the next commands."""

from __future__ import annotations

import shlex

import pytest

from lora_ns import report

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
    train, evals = report.loss_points(HISTORY)
    assert train == [(5, 2.5), (10, 2.1), (15, 1.7)]
    assert evals == [(10, 2.3), (20, 1.9)]


def test_write_report_draws_a_png_and_writes_the_summary(adapter_dir, capsys):
    report.write_report(HISTORY, adapter_dir, SUMMARY)
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
    commands = dict(report.next_commands(adapter_dir))
    assert set(commands) == {"try it", "evaluate it", "merge it"}
    infer = shlex.split(commands["try it"])
    assert infer[:3] == ["python", "-m", "lora_ns.infer"] and infer[infer.index("--model") + 1] == str(adapter_dir)
    evaluate = shlex.split(commands["evaluate it"])
    assert evaluate[3] == str(adapter_dir / "recipe.yaml")
    assert evaluate[evaluate.index("--adapter") + 1] == str(adapter_dir)
    merge = shlex.split(commands["merge it"])
    assert merge[merge.index("--adapter") + 1] == str(adapter_dir)
    assert merge[merge.index("--output") + 1] == str(adapter_dir.parent / "my run-merged")


def test_a_full_fine_tune_is_called_a_model_and_has_no_merge_step(tmp_path, capsys):
    report.write_report(HISTORY, tmp_path, SUMMARY)
    text = (tmp_path / "summary.txt").read_text(encoding="utf-8")
    assert f"model:            {tmp_path}" in text
    assert "lora_ns.merge" not in text and f"--model {tmp_path}" in text


def test_no_logged_loss_means_no_png_and_says_why(adapter_dir, capsys):
    history = [{"train_runtime": 1.0, "train_loss": 2.0, "epoch": 1.0, "step": 3}]
    report.write_report(history, adapter_dir, {"steps": 3, "seconds": 1.0})
    assert not (adapter_dir / "loss_curve.png").exists()
    text = (adapter_dir / "summary.txt").read_text(encoding="utf-8")
    assert "not drawn: no loss was logged" in text and "training.logging_steps" in text
    assert "no evaluation ran" in text


def test_a_failing_plot_leaves_no_partial_png_and_the_summary_still_lands(adapter_dir, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, fh, **kwargs):
        fh.write(PNG_SIGNATURE + b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    report.write_report(HISTORY, adapter_dir, SUMMARY)
    assert sorted(p.name for p in adapter_dir.iterdir()) == ["adapter_config.json", "summary.txt"]
    captured = capsys.readouterr()
    assert "loss curve not drawn: OSError: disk full" in captured.err
    assert "not drawn: OSError: disk full" in (adapter_dir / "summary.txt").read_text(encoding="utf-8")


def test_the_report_replaces_an_earlier_one(adapter_dir, capsys):
    (adapter_dir / "summary.txt").write_text("old summary")
    (adapter_dir / "loss_curve.png").write_bytes(b"old")
    report.write_report(HISTORY, adapter_dir, SUMMARY)
    assert (adapter_dir / "loss_curve.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "old summary" not in (adapter_dir / "summary.txt").read_text(encoding="utf-8")
