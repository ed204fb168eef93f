"""Shared test set-up: fully offline, builtin tiny models built once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Before anything imports huggingface_hub / transformers / datasets.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every cache the tests read or write lives in one folder made for this session and removed after it:
# nothing lands in ~/.cache, and neither a user's Hugging Face caches (hub models, datasets) nor their
# LORA_NS_CACHE can change what the tests run. Assigned, not setdefault. Subprocesses inherit it, so
# the builtin tiny models are built once per session and shared by every test.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="lora_ns_tests_"))
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ["HF_HOME"] = str(_SESSION_CACHE / "hf")
os.environ["HF_HUB_CACHE"] = str(_SESSION_CACHE / "hf" / "hub")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_CACHE / "hf" / "datasets")
os.environ["LORA_NS_CACHE"] = str(_SESSION_CACHE / "lora_ns")

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    """Path to the builtin tiny Llama (random weights, BPE tokenizer with a ChatML template)."""
    from lora_ns.builtin_models import resolve_model_path

    return resolve_model_path("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> str:
    from lora_ns.builtin_models import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen2")


@pytest.fixture(scope="session")
def tiny_bert() -> str:
    """Path to the builtin tiny BERT for sequence classification (WordPiece tokenizer)."""
    from lora_ns.builtin_models import resolve_model_path

    return resolve_model_path("builtin:tiny-bert")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test from a temporary working directory (so outputs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_adapter(out: Path, recipe) -> Path:
    """Wrap the recipe's base with peft and save it like training does (no training: fast).

    With ``peft.init_lora_weights=false`` the adapter changes the outputs, so tests can tell
    base and tuned apart.
    """
    import torch

    from lora_ns.adapters import apply_peft
    from lora_ns.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe)
    torch.manual_seed(0)
    apply_peft(load_model(recipe, tokenizer), recipe).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return out


def fp32_reassociation_tol(reference) -> float:
    """Bound for merged (W + s*BA) x vs unmerged W x + s*B(A x) in fp32, relative to the logits' scale.

    Only the order of fp32 operations differs. Each dot product sums at most K = 128 terms (the tiny
    models' intermediate size), whose rounding is bounded by K * eps relative; 2 layers x 4 linears in
    series compound it, so 8 * 128 * eps ~ 1.2e-4 of the logits' scale, independent of the CPU.
    """
    import torch

    scale = max(float(t.abs().max()) for t in reference)
    return 8 * 128 * torch.finfo(torch.float32).eps * scale
