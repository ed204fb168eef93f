"""``task: pretrain``: a causal LM from random weights (``model.config``: a preset below, a folder or a hub
id), trained in full on a text corpus tokenized, joined with EOS and cut into ``max_length`` rows once, then
cached under ``$LORA_NS_CACHE/pretrain_data/<key>`` for later runs and every rank (README: "Pretraining from
scratch").
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterator

from lora_ns.builtin_models import cache_dir, resolve_model_path
from lora_ns.config import Recipe
from lora_ns.data import build_datasets
from lora_ns.data.loading import columns_of
from lora_ns.data.sources import LocalSource, source_for
from lora_ns.errors import Problem, UserError, first_line
from lora_ns.fileio import atomic_folder

# name -> (transformers config class, its arguments). Counts: `parameter_count` on the meta device,
# embeddings tied, with the preset's own vocab (a larger tokenizer grows it, see `architecture`).
_QWEN3 = dict(vocab_size=151936, num_hidden_layers=28, head_dim=128, max_position_embeddings=32768,
              rope_theta=1e6, tie_word_embeddings=True)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # 139,840 parameters: for tests, sized to the builtin tiny tokenizers (vocab 1024).
    "tiny": ("Qwen2Config", dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 tie_word_embeddings=True)),
    # 124,439,808 and 354,823,168 parameters: GPT-2 small and medium.
    "gpt2-124m": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "gpt2-355m": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16)),
    # 596,049,920 parameters: the shapes of Qwen3-0.6B.
    "qwen-600m": ("Qwen3Config", dict(_QWEN3, hidden_size=1024, intermediate_size=3072,
                                      num_attention_heads=16, num_key_value_heads=8)),
    # 1,202,352,640 parameters: Qwen3 layers at width 1536 (between Qwen3-0.6B and -1.7B).
    "qwen-1.2b": ("Qwen3Config", dict(_QWEN3, hidden_size=1536, intermediate_size=6144,
                                      num_attention_heads=12, num_key_value_heads=4)),
}
TIKTOKEN_ENCODINGS = ("r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base", "o200k_harmony")
VOCAB_MULTIPLE = 64  # a grown vocab is rounded up to this: matmul-friendly (GPT-2's 50257 -> 50304 trick)


# --- architecture and tokenizer -------------------------------------------------------------------

def architecture(recipe: Recipe, tokenizer=None):
    """The config `model.config` names: its vocab grown to fit the tokenizer, special tokens taken from it,
    and its positions to max_length."""
    import transformers

    name = recipe.model.config or ""
    if name in PRESETS and not Path(name).is_dir():
        config = getattr(transformers, PRESETS[name][0])(**PRESETS[name][1])
    else:
        try:
            config = transformers.AutoConfig.from_pretrained(name, revision=recipe.model.revision,
                                                             trust_remote_code=recipe.model.trust_remote_code)
        except (OSError, ValueError) as err:
            why = first_line(err)
            raise UserError(recipe.problem("model.config", f"no architecture config '{name}': {why}",
                                           f"use a preset ({', '.join(PRESETS)}), a folder with config.json, "
                                           "or a hub id whose config is cached"))
    length = recipe.training.get("max_length")
    if length and getattr(config, "max_position_embeddings", 0) < length:
        # from scratch every position is trained: a GPT-2 preset's 1024 learned ones would stop a longer row
        config.max_position_embeddings = length  # (GPT2Config maps the name to n_positions)
    if tokenizer is not None:
        if len(tokenizer) > config.vocab_size:
            config.vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        for kind in ("eos_token_id", "bos_token_id", "pad_token_id"):
            setattr(config, kind, getattr(tokenizer, kind))
    return config


def pretrain_tokenizer(recipe: Recipe):
    """The recipe's tokenizer with an EOS (the document separator) and a pad token; a tiktoken encoding is
    converted once into the lora_ns cache (its pad given at construction: `cache_key` hashes that state)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from lora_ns.model import tokenizer_as_trained  # model imports this module: a cycle

    name, field = recipe.model.tokenizer_name_or_path or "", "model.tokenizer_name_or_path"
    if name in TIKTOKEN_ENCODINGS:
        folder = cache_dir() / "tokenizers" / name
        if not (folder / "tokenizer.json").is_file():
            _convert_tiktoken(recipe, name, folder)
        eos = "<|endoftext|>"
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token=eos,
                                       pad_token=eos)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name), revision=recipe.model.revision,
                                              trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.eos_token is None:
        raise UserError(recipe.problem(field, f"tokenizer {name} has no EOS token, needed between packed "
                                       "documents", "use a tokenizer that has one"))
    return tokenizer_as_trained(tokenizer)  # pad = EOS where it has none; no chat template for pretraining


def _convert_tiktoken(recipe: Recipe, name: str, folder: Path) -> None:
    from transformers.integrations.tiktoken import convert_tiktoken_to_fast

    field = "model.tokenizer_name_or_path"
    try:
        import tiktoken
    except ImportError:
        raise UserError(recipe.problem(field, f"{name} is a tiktoken encoding, tiktoken is not installed",
                                       "pip install tiktoken blobfile"))
    try:
        encoding = tiktoken.get_encoding(name)
    except Exception as err:  # offline: tiktoken downloads its BPE file on first use
        why = f"tiktoken cannot get the {name} BPE file ({type(err).__name__}; downloaded on first use)"
        raise UserError(recipe.problem(field, why, "run once with network access (cached in "
                                       "TIKTOKEN_CACHE_DIR), or name a tokenizer folder"))
    convert_tiktoken_to_fast(encoding, str(folder))


def init_model(recipe: Recipe, tokenizer):
    """A randomly initialised model of the recipe's architecture (call `transformers.set_seed` first)."""
    from transformers import AutoModelForCausalLM

    from lora_ns.model import attention_problem, torch_dtype  # model imports this module: a cycle

    if (problem := attention_problem(recipe)) is not None:
        raise UserError(problem)
    config = architecture(recipe, tokenizer)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(recipe.model.dtype),
                                            attn_implementation=recipe.model.attn_implementation)


# --- data: tokenize once, pack, cache -------------------------------------------------------------

def pack(batch: dict[str, list], tokenizer, length: int) -> dict[str, list]:
    """Tokenize a batch of documents, join them with EOS between, cut into rows of `length` tokens."""
    flat = [t for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            for t in (*ids, tokenizer.eos_token_id)]
    return {"input_ids": [flat[i:i + length] for i in range(0, len(flat) - length + 1, length)]}


def cache_key(recipe: Recipe, tokenizer) -> str:
    """What the tokenized shards depend on: corpus files, the dataset section, tokenizer, max_length
    (hashed as datasets hashes a map's arguments: the tokenizer's whole state)."""
    from datasets.fingerprint import Hasher

    cfg = recipe.dataset
    sources = [source_for(cfg)] + ([source_for(cfg, cfg.val_split, "dataset.val_split")]
                                   if isinstance(cfg.val_split, str) else [])
    files = [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns]
             for s in sources if isinstance(s, LocalSource) for f in s.files]  # [] for a hub dataset
    return Hasher.hash({"files": files, "dataset": cfg.model_dump(mode="json"), "version": 1,
                        "max_length": int(recipe.training["max_length"]), "tokenizer": tokenizer})


def _packed(dataset, tokenizer, length: int):
    import datasets

    kwargs = {"desc": "Tokenizing and packing"} if isinstance(dataset, datasets.Dataset) else {}
    # a stream may not know its columns (None): every one must go, as packing changes the number of rows
    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=columns_of(dataset),
                       fn_kwargs={"tokenizer": tokenizer, "length": length}, **kwargs)


def pretrain_datasets(recipe: Recipe, tokenizer):
    """(train, validation or None): rows of ``max_length`` token ids, built once and then reused."""
    import datasets

    length = int(recipe.training["max_length"])  # required for pretrain (see `check_pretrain`)
    if recipe.dataset.streaming:
        splits = build_datasets(recipe, tokenizer)
        return tuple(None if s is None else _packed(s, tokenizer, length) for s in splits)
    target = cache_dir() / "pretrain_data" / cache_key(recipe, tokenizer)
    if built := not target.is_dir():  # written in a temporary folder, then renamed: whole or absent
        with atomic_folder(target, replace=False) as folder:  # another process may finish first
            for name, split in zip(("train", "validation"), build_datasets(recipe, tokenizer)):
                if split is None:
                    continue
                if len(rows := _packed(split, tokenizer, length)) == 0:  # an empty shard would not load
                    raise UserError(recipe.problem("training.max_length", f"the {name} text holds fewer "
                                                   f"than max_length={length} tokens: not one packed row",
                                                   "lower training.max_length, or use more text"))
                rows.save_to_disk(str(folder / name))
    loaded = {name: datasets.load_from_disk(str(target / name))
              for name in ("train", "validation") if (target / name).is_dir()}
    if os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        said = ", ".join(f"{name} {len(rows) * length:,} tokens in {len(rows):,} rows"
                         for name, rows in loaded.items())
        print(f"lora_ns: pretrain data {'built' if built else 'reused'} ({target}): {said}")
    return loaded["train"], loaded.get("validation")


# --- checks and the numbers validate prints -------------------------------------------------------

def check_pretrain(r: Recipe) -> Iterator[Problem]:
    """Cross-field rules for task: pretrain (and model.config outside it)."""
    if r.task != "pretrain":
        if r.model.config:
            yield r.problem("model.config", "only used by task: pretrain", "remove it, or set task: pretrain")
        return
    if not r.model.config:
        yield r.problem("model.config", "pretrain needs an architecture", f"set model.config to a preset "
                        f"({', '.join(PRESETS)}) or a folder/hub id with config.json")
    if not r.model.tokenizer_name_or_path:
        yield r.problem("model.tokenizer_name_or_path", "pretrain needs a tokenizer", "name one (hub id, "
                        "folder, builtin:tiny-llama) or a tiktoken encoding such as cl100k_base")
    if r.peft.method != "full":
        yield r.problem("peft.method", f"{r.peft.method} adapts pretrained weights; pretraining trains all",
                        "set peft.method: full")
    if not r.training.get("max_length"):
        yield r.problem("training.max_length", "pretrain packs documents into rows of max_length tokens",
                        "set training.max_length (e.g. 1024)")
    if int(r.training.get("max_steps", -1)) <= 0:
        yield r.problem("training.max_steps", "pretraining is scheduled in optimizer steps",
                        "set training.max_steps (tokens = steps × tokens per step, see validate)")


def architecture_problem(recipe: Recipe) -> Problem | None:
    """A model.config that names no preset, folder or reachable hub config."""
    try:
        architecture(recipe)
    except UserError as err:
        return err.problems[0]
    return None


def describe_pretrain(recipe: Recipe, world_size: int | None = None) -> list[str]:
    """Lines for validate: parameters (counted on the meta device), tokens per optimizer step and per run.
    Processes: WORLD_SIZE under a launcher, else the visible GPUs, else 1."""
    import torch
    from transformers import AutoModelForCausalLM

    t, tokenizer, note = recipe.training, None, ""
    try:
        tokenizer = pretrain_tokenizer(recipe)
    except (UserError, OSError, ValueError) as err:
        note = f" (the config's vocab: tokenizer not loaded: {first_line(err)})"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(architecture(recipe, tokenizer))
    params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    processes = world_size or int(os.environ.get("WORLD_SIZE") or max(torch.cuda.device_count(), 1))
    sizes = {"batch": int(t.get("per_device_train_batch_size", 8)),  # TrainingArguments' default
             "accumulation": int(t.get("gradient_accumulation_steps", 1)), "max_length": int(t["max_length"]),
             "processes": processes}
    per_step, steps = math.prod(sizes.values()), int(t["max_steps"])
    return [f"pretrain: {params:,} parameters from {recipe.model.config}{note}",
            f"pretrain: {per_step:,} tokens per optimizer step ("
            + " × ".join(f"{v} {k}" for k, v in sizes.items()) + ")",
            f"pretrain: {per_step * steps:,} tokens in {steps:,} steps"]
