"""task: pretrain: random init from a preset, packed shards cached, resume, then LoRA on the result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lora_ns.config import parse_recipe
from lora_ns.errors import UserError, run_cli

REPO = Path(__file__).resolve().parent.parent
MAX_LENGTH, BATCH, STEPS, MORE_STEPS = 64, 8, 30, 40


def pretrain_data(out: Path, **training) -> dict:
    return {
        "task": "pretrain",
        "model": {"config": "tiny", "tokenizer_name_or_path": "builtin:tiny-llama", "dtype": "fp32"},
        "peft": {"method": "full"},
        "dataset": {"path": "sample:cpt_text", "formatter": "text", "val_split": 0.1},
        "training": {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": BATCH,
                     "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "max_length": MAX_LENGTH, "save_steps": STEPS, "seed": 0, "report_to": "none",
                     **training},
    }


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def train_cli(out: Path, recipe_file: str, *overrides: str) -> dict:
    """`python -m lora_ns.train RECIPE OVERRIDES` in this process; the run summary it wrote into `out`."""
    from lora_ns.train import main

    assert run_cli("lora_ns.train", lambda: main([recipe_file, *overrides])) == 0
    return json.loads((out / "run_summary.json").read_text())


def losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def test_pretrain_resume_and_lora_on_the_result(tmp_path, capsys):
    first, second, tuned = tmp_path / "first", tmp_path / "second", tmp_path / "lora"
    corpus = tmp_path / "corpus.txt"  # a file of its own: a shard cache no other test can have built
    corpus.write_bytes((REPO / "lora_ns" / "samples" / "cpt_text.txt").read_bytes())
    data = pretrain_data(first)
    data["dataset"]["path"] = str(corpus)
    recipe_file = write(tmp_path / "pretrain.yaml", data)

    summary = train_cli(first, recipe_file)
    said = capsys.readouterr()
    assert "pretrain data built" in said.out, said.out
    # Random init starts near ln(vocab) = 6.9; a model that learned the corpus's tokens is far below it.
    assert summary["steps"] == STEPS and summary["first_loss"] > math.log(1024) - 0.5, summary
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary
    saved = json.loads((first / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["hidden_size"] == 64
    assert (first / "model.safetensors").is_file()
    from lora_ns.builtin_models import cache_dir
    from lora_ns.config import load_recipe
    from lora_ns.pretrain import cache_key, pretrain_tokenizer

    recipe = load_recipe(recipe_file)
    cache = cache_dir() / "pretrain_data" / cache_key(recipe, pretrain_tokenizer(recipe)) / "train"
    cache /= "state.json"  # written by save_to_disk: a rebuild would rewrite it
    built_at = cache.stat().st_mtime_ns

    # A second invocation with more steps continues from the first run's checkpoint, on the cached shards.
    summary2 = train_cli(second, recipe_file, f"training.output_dir={second}",
                         f"training.max_steps={MORE_STEPS}",
                         f"training.resume_from_checkpoint={first / f'checkpoint-{STEPS}'}")
    said = capsys.readouterr()
    assert "pretrain data reused" in said.out and cache.stat().st_mtime_ns == built_at, said.out
    assert summary2["steps"] == MORE_STEPS and "resuming from" in said.err
    # A run from step 0 would save checkpoint-30 on its way (save_steps); the resumed one starts past it.
    assert sorted(p.name for p in second.glob("checkpoint-*")) == [f"checkpoint-{MORE_STEPS}"]
    logged = losses(second)
    assert {s: logged[s] for s in range(1, STEPS + 1)} == losses(first)  # history came with the checkpoint
    assert logged[STEPS + 1] < summary["first_loss"] - 1.0  # and so did the trained weights

    # The pretrained folder is a base model any recipe can name: a LoRA adapter on top of it.
    lora = {"task": "cpt", "model": {"name_or_path": str(second), "dtype": "fp32"},
            "peft": {"method": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "dataset": {"path": "sample:cpt_text", "formatter": "text"},
            "training": {"output_dir": str(tuned), "max_steps": 3, "per_device_train_batch_size": BATCH,
                         "max_length": MAX_LENGTH, "logging_steps": 1, "report_to": "none",
                         "save_strategy": "no"}}
    summary3 = train_cli(tuned, write(tmp_path / "lora.yaml", lora))
    assert json.loads((tuned / "adapter_config.json").read_text())["base_model_name_or_path"] == str(second)
    assert summary3["first_loss"] < summary["first_loss"] - 1.0  # LoRA starts from the pretrained weights


def test_a_streamed_corpus_is_packed_as_it_trains(tmp_path):
    """The shipped pretrain recipe streams its corpus. A stream does not know its columns, so packing kept
    'text' beside rows of another count and the first step failed ("Column lengths mismatch")."""
    from lora_ns.train import run_training

    data = pretrain_data(tmp_path / "out", max_steps=2)
    data["dataset"].update(streaming=True, val_split=None)
    trainer, summary = run_training(parse_recipe(data))
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    assert len(next(iter(trainer.train_dataset))["input_ids"]) == MAX_LENGTH


def test_pretrain_rules_name_the_fix():
    bad = pretrain_data(Path("out"))
    bad["peft"] = {"method": "lora"}
    del bad["training"]["max_length"]
    from lora_ns.validate.rules import check_rules

    problems = {p.field: p for p in check_rules(parse_recipe(bad, "p.yaml")) if p.is_error}
    assert "set peft.method: full" in problems["peft.method"].fix
    assert "training.max_length" in problems
    other = {"model": {"name_or_path": "builtin:tiny-llama", "config": "tiny"},
             "dataset": {"path": "sample:gsm8k"}}
    assert any(p.field == "model.config" for p in check_rules(parse_recipe(other, "o.yaml")))


def test_validate_of_a_pretrain_recipe_checks_its_architecture_and_packs(tmp_path, capsys):
    """An unknown model.config printed "OK", then the error (the architecture was first read for the token
    lines under OK); and the data lines spoke of rows truncated and padded, which packed blocks never are."""
    from lora_ns.errors import run_cli
    from lora_ns.validate.__main__ import main

    data = pretrain_data(tmp_path / "out")
    data["model"]["config"] = "gpt2-124mm"
    assert run_cli("lora_ns.validate", lambda: main([write(tmp_path / "p.yaml", data)])) == 2
    out, err = capsys.readouterr()
    assert "OK" not in out and "model.config: no architecture config 'gpt2-124mm'" in err, (out, err)
    data["model"]["config"] = "tiny"
    assert main([write(tmp_path / "p.yaml", data)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("OK ") and "truncated" not in err and "padding" not in err, err


def test_describe_pretrain_counts_parameters_and_tokens():
    from lora_ns.pretrain import describe_pretrain

    recipe = parse_recipe(pretrain_data(Path("out"), gradient_accumulation_steps=4), "p.yaml")
    lines = describe_pretrain(recipe, world_size=2)
    assert lines[0].startswith("pretrain: 139,840 parameters from tiny"), lines  # the preset table's count
    per_step = BATCH * 4 * MAX_LENGTH * 2
    assert f"{per_step:,} tokens per optimizer step" in lines[1]
    assert f"{per_step * STEPS:,} tokens in {STEPS} steps" in lines[2]


def test_show_sample_says_pretrain_rows_are_packed_blocks():
    """Pretrain is trained by SFTTrainer (lora_ns.memory.SFT_TASKS) but has no formatted rows to show."""
    from lora_ns.validate.sample import show_sample

    (line,) = show_sample(parse_recipe(pretrain_data(Path("out")), "p.yaml"), 2)
    assert "trains on packed token blocks" in line and "not trained by SFTTrainer" not in line, line


def test_pack_joins_documents_with_eos_into_full_rows():
    from lora_ns.pretrain import pack, pretrain_tokenizer

    tokenizer = pretrain_tokenizer(parse_recipe(pretrain_data(Path("out")), "p.yaml"))
    docs = ["The Purchaser shall pay.", "Interest accrues.", "Governed by the laws of Scotland."]
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    rows = pack({"text": docs}, tokenizer, 5)["input_ids"]
    assert rows == [flat[i:i + 5] for i in range(0, len(flat) // 5 * 5, 5)]  # the short tail is dropped


def test_vocab_grows_to_fit_the_tokenizer():
    from lora_ns.pretrain import VOCAB_MULTIPLE, architecture, pretrain_tokenizer

    recipe = parse_recipe(pretrain_data(Path("out")), "p.yaml")
    tokenizer = pretrain_tokenizer(recipe)
    assert architecture(recipe, tokenizer).vocab_size == 1024  # the preset's, the tiny tokenizer fits
    tokenizer.add_tokens(["<|one_more|>"])
    grown = architecture(recipe, tokenizer)
    assert grown.vocab_size >= len(tokenizer) and grown.vocab_size % VOCAB_MULTIPLE == 0
    assert grown.eos_token_id == tokenizer.eos_token_id


def test_learned_positions_grow_to_max_length(tmp_path):
    """GPT-2's positions are learned embeddings (1024 in the presets): packed rows of a longer max_length
    stopped the first step. From scratch every position is trained, so the architecture takes max_length."""
    from transformers import GPT2Config

    from lora_ns.pretrain import architecture

    folder = tmp_path / "gpt2-tiny"
    GPT2Config(vocab_size=1024, n_positions=16, n_embd=32, n_layer=1, n_head=2).save_pretrained(folder)
    data = pretrain_data(tmp_path / "out", max_steps=2, save_steps=2, max_length=32)
    data["model"]["config"] = str(folder)
    assert architecture(parse_recipe(data, "p.yaml")).n_positions == 32
    summary = train_cli(tmp_path / "out", write(tmp_path / "p.yaml", data))
    assert summary["steps"] == 2


def test_cache_key_follows_corpus_max_length_and_tokenizer(tmp_path):
    from lora_ns.pretrain import cache_key, pretrain_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\nanother one\n", encoding="utf-8")
    data = pretrain_data(Path("out"))
    data["dataset"]["path"] = str(corpus)
    recipe = parse_recipe(data, "p.yaml")
    tokenizer = pretrain_tokenizer(recipe)
    key = cache_key(recipe, tokenizer)
    assert cache_key(recipe, tokenizer) == key
    data["training"]["max_length"] = 128
    longer = parse_recipe(data, "p.yaml")
    assert cache_key(longer, tokenizer) != key
    corpus.write_text("one document\nanother one, edited\n", encoding="utf-8")
    edited = cache_key(recipe, tokenizer)
    assert edited != key
    tokenizer.add_tokens(["<|another_token|>"])  # a different vocabulary tokenizes differently
    assert cache_key(recipe, tokenizer) != edited


def test_tiktoken_encoding_offline_is_one_line(tmp_path, monkeypatch):
    from lora_ns.pretrain import pretrain_tokenizer

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # nothing cached: it would have to download
    data = pretrain_data(tmp_path)
    data["model"]["tokenizer_name_or_path"] = "cl100k_base"
    with pytest.raises(UserError) as err:
        pretrain_tokenizer(parse_recipe(data, "p.yaml"))
    (problem,) = err.value.problems
    assert problem.field == "model.tokenizer_name_or_path" and "tiktoken" in str(problem)
    assert "\n" not in str(problem)


def test_text_shorter_than_one_row_is_one_line_and_caches_nothing(tmp_path, capsys):
    """A corpus with fewer tokens than max_length packs into no row: an empty shard was cached, which
    datasets cannot load (an IndexError, on every later run too). Now one line, and no cache entry."""
    from lora_ns.builtin_models import cache_dir

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one short document\n", encoding="utf-8")
    data = pretrain_data(tmp_path / "out")
    data["dataset"].update(path=str(corpus), val_split=None)
    before = set((cache_dir() / "pretrain_data").glob("*"))
    from lora_ns.train import main

    assert run_cli("lora_ns.train", lambda: main([write(tmp_path / "p.yaml", data)])) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"training.max_length: the train text holds fewer than max_length={MAX_LENGTH} tokens" in line
    assert set((cache_dir() / "pretrain_data").glob("*")) == before
    assert not (tmp_path / "out").exists()
