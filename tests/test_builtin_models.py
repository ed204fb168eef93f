"""Builtin offline models: built once, loadable with from_pretrained, tokenizers fit for SFT."""

from __future__ import annotations

import pytest

from lora_ns.builtin_models import BUILD_VERSION, resolve_model_path
from lora_ns.errors import UserError


def test_causal_tokenizer_keeps_chinese_and_has_a_training_chat_template(tiny_llama):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = "请用中文回答：今天天气很好。"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert has_generation_markers(tok.chat_template)  # TRL's own check for assistant-only loss
    assert tok.pad_token != tok.eos_token
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_tiny_models_load_and_run(tiny_llama, tiny_qwen2, tiny_bert):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    for path, arch in ((tiny_llama, "LlamaForCausalLM"), (tiny_qwen2, "Qwen2ForCausalLM")):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.architectures == [arch]
        ids = AutoTokenizer.from_pretrained(path)("hello world", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape[-1] == model.config.vocab_size
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = tok("the dog", "a cat", return_tensors="pt")
    assert tok.convert_ids_to_tokens(enc["input_ids"][0])[0] == "[CLS]"
    with torch.no_grad():
        assert bert(**enc).logits.shape == (1, 3)


def test_build_is_cached(tiny_llama):
    assert resolve_model_path("builtin:tiny-llama") == tiny_llama


def test_unknown_builtin_is_a_user_error():
    with pytest.raises(UserError, match="unknown builtin model 'builtin:nope'"):
        resolve_model_path("builtin:nope")


def test_hub_names_pass_through_untouched():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


def test_smollm2_without_gguf_is_one_line_naming_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("LORA_NS_CACHE", str(tmp_path))  # not built yet in this cache
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if gguf were not installed
    with pytest.raises(UserError, match="package 'gguf' is not installed"):
        resolve_model_path("builtin:smollm2-135m")
    assert not (tmp_path / "models" / f"smollm2-135m-v{BUILD_VERSION}").exists()  # nothing half-built
