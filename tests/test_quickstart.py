"""The README's first command: the embedded default trains offline and the loss goes down."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_quickstart_trains_and_loss_goes_down(tmp_path):
    out = tmp_path / "quickstart"
    run = subprocess.run(
        [sys.executable, "-m", "lora_ns.train", str(REPO / "recipes" / "quickstart.yaml"),
         f"training.output_dir={out}", "training.max_steps=40"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["last_loss"] < summary["first_loss"] - 0.1, summary
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "adapter_config.json").is_file()
    assert (out / "recipe.yaml").is_file()
    assert f"adapter saved to {out}" in run.stdout
