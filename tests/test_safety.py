"""Safe defaults: remote code only when the recipe asks (with a warning), only safetensors weights saved,
and hub tokens taken from the environment, never written into the output dir, logs or TensorBoard."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns.config import parse_recipe

from conftest import REPO

SECRET = "hf_dummy_secret_123"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
# Trainer's own state files (torch pickles of optimizer/scheduler/RNG state and of the arguments), not weights.
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "training_args.bin"}
BASE = {"task": "causal_lm", "model": {"name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 8}}


def run(module: str, recipe: dict, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets_cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, str(path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=420)


# --- trust_remote_code --------------------------------------------------------------------------------

def test_remote_code_is_off_unless_the_recipe_sets_it():
    from lora_ns.model import model_kwargs

    assert model_kwargs(parse_recipe(BASE))["trust_remote_code"] is False
    trusting = parse_recipe({**BASE, "model": {**BASE["model"], "trust_remote_code": True}})
    assert model_kwargs(trusting)["trust_remote_code"] is True


def test_weights_are_never_unpickled(tmp_path):
    """from_pretrained gets use_safetensors=True, and a folder with only pickle weights is refused before it."""
    from lora_ns.model import model_folder_problem, model_kwargs

    assert model_kwargs(parse_recipe(BASE))["use_safetensors"] is True
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    problem = model_folder_problem(parse_recipe({**BASE, "model": {"name_or_path": str(tmp_path)}}))
    assert problem is not None and "pickle" in problem.message
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert model_folder_problem(parse_recipe({**BASE, "model": {"name_or_path": str(tmp_path)}})) is None


def test_no_code_path_turns_remote_code_on_by_itself():
    """No `trust_remote_code=True`, `{"trust_remote_code": True}` or `trust_remote_code: bool = True` in lora_ns."""
    found = []
    for path in sorted((REPO / "lora_ns").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            pairs: list[tuple[str | None, ast.AST]] = []
            if isinstance(node, ast.keyword):
                pairs = [(node.arg, node.value)]
            elif isinstance(node, ast.Dict):
                pairs = [(k.value if isinstance(k, ast.Constant) else None, v) for k, v in zip(node.keys, node.values)]
            elif isinstance(node, ast.arguments):
                named = node.posonlyargs + node.args
                pairs = [(a.arg, d) for a, d in zip(named[len(named) - len(node.defaults):], node.defaults)]
                pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None]
            found += [f"{path.relative_to(REPO)}:{v.lineno}" for k, v in pairs
                      if k == "trust_remote_code" and isinstance(v, ast.Constant) and v.value is True]
    assert found == []


def test_validate_warns_about_remote_code(tmp_path):
    result = run("lora_ns.validate", {**BASE, "model": {**BASE["model"], "trust_remote_code": True}}, tmp_path,
                 "--no-data", "--no-model")
    assert result.returncode == 0, result.stderr
    assert any("warning:" in line and "model.trust_remote_code" in line for line in result.stderr.splitlines())
    quiet = run("lora_ns.validate", BASE, tmp_path, "--no-data", "--no-model")
    assert quiet.returncode == 0 and "trust_remote_code" not in quiet.stderr


# --- tokens -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, change", [
    ("training.hub_token", {"training": {"hub_token": SECRET}}),
    ("model.tokenizer_name_or_path", {"model": {**BASE["model"], "tokenizer_name_or_path": SECRET}}),
    ("model.hub_token", {"model": {**BASE["model"], "hub_token": SECRET}}),  # not a field at all
])
def test_tokens_in_a_recipe_are_refused_without_echoing_them(tmp_path, where, change):
    result = run("lora_ns.validate", {**BASE, **change}, tmp_path, "--no-data", "--no-model")
    assert result.returncode == 2
    assert where in result.stderr
    assert SECRET not in result.stderr + result.stdout, "the error message repeats the secret"


def test_token_rule_fix_and_false_positives():
    from lora_ns.run_record import is_secret, looks_like_secret
    from lora_ns.validate.rules import no_secrets_in_recipe

    (problem,) = no_secrets_in_recipe(parse_recipe({**BASE, "training": {"hub_token": SECRET}}))
    assert problem.field == "training.hub_token" and "export HF_TOKEN instead" in problem.fix
    for harmless in ("meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct", "<|endoftext|>", "hf_"):
        assert not looks_like_secret(harmless), harmless
    for secret in (SECRET, "hf_" + "aB3" * 11, "ghp_" + "x1" * 18, "sk-" + "Q9" * 20):
        assert looks_like_secret(secret), secret
    # is_secret (validate refuses it, train leaves it out of the saved recipe): any set hub_token, else the
    # field's name and the value's shape together
    assert is_secret("hub_token", "not-token-shaped") and not is_secret("hub_token", None)
    assert is_secret("wandb_api_key", "sk-" + "Q9" * 20) and not is_secret("eos_token", "<|im_end|>")
    assert not is_secret("dataset_text_field", SECRET)


# --- a real run ---------------------------------------------------------------------------------------

def test_training_output_has_no_token_and_only_safetensors_weights(tmp_path, tiny_llama):
    out = tmp_path / "out"
    recipe = {**BASE, "peft": {"method": "lora", "r": 4, "lora_dropout": 0.0},
              "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 2,
                           "logging_steps": 1, "save_strategy": "steps", "save_steps": 2, "max_length": 64,
                           "report_to": "tensorboard"}}
    result = run("lora_ns.train", recipe, tmp_path, env={"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET})
    assert result.returncode == 0, result.stderr[-4000:]
    assert SECRET not in result.stdout + result.stderr

    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "adapter_model.safetensors").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in files), "no TensorBoard log to check"
    assert any(p.parent.name.startswith("checkpoint-") for p in files), "no checkpoint to check"
    leaked = [str(p.relative_to(out)) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaked == []

    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    weights = [str(p.relative_to(out)) for p in pickles
               if p.name not in TRAINER_STATE and not p.name.startswith("rng_state")]
    assert weights == [], "weights saved as pickles instead of safetensors"
    outside_checkpoints = [p.name for p in pickles if not p.parent.name.startswith("checkpoint-")]
    assert set(outside_checkpoints) <= {"training_args.bin"}
