"""Merging: logits match the unmerged adapter, QLoRA requantization, dtype, overwrite and atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_ns.errors import UserError, run_cli
from lora_ns.merge import main, merge

from conftest import fp32_reassociation_tol

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
PROMPTS = ["Question: Ben has 33 stickers and gives away 27. How many are left?", "#### 1,080 and -3.5"]


def make_adapter(out: Path, overrides: list[str], recipe_file: Path = QUICKSTART,
                 random_init: str = "peft.init_lora_weights=false") -> Path:
    """A saved adapter dir like training leaves (weights, tokenizer, recipe.yaml), with random LoRA B."""
    from lora_ns.adapters import apply_peft
    from lora_ns.config import load_recipe
    from lora_ns.model import load_model, load_tokenizer

    recipe = load_recipe(recipe_file, [f"training.output_dir={out}", random_init, *overrides])
    tokenizer = load_tokenizer(recipe)
    torch.manual_seed(0)
    model = apply_peft(load_model(recipe, tokenizer), recipe)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    return out


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        # on the model's device (inference.load puts an unquantized model on cuda), compared on the CPU
        return [model(**tokenizer(p, return_tensors="pt").to(model.device)).logits.float().cpu() for p in PROMPTS]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_llama) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "out", [])


@pytest.fixture(scope="module")
def qlora_dir(tmp_path_factory, tiny_llama) -> Path:
    return make_adapter(tmp_path_factory.mktemp("qlora") / "out",
                        ["quantization.load_in_4bit=true", "peft.method=qlora"])


def load_merged(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_merged_logits_equal_the_adapter_model(lora_dir, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    info = merge(str(lora_dir), str(tmp_path / "merged"))
    merged, tokenizer = load_merged(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    base_logits = logits(base, tokenizer)
    with_adapter = logits(PeftModel.from_pretrained(base, str(lora_dir)).eval(), tokenizer)

    tol = fp32_reassociation_tol(with_adapter)
    assert max_diff(logits(merged, tokenizer), with_adapter) < tol
    assert max_diff(with_adapter, base_logits) > 100 * tol  # the adapter really changes the model
    assert info["max_logit_diff_fp32"] < tol and info["dtype"] == "fp32" and not info["requantized"]
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "recipe.yaml", "merge_info.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    assert not any(name.startswith(".") for name in files)


def kernel_epsilon() -> float:
    """Unit roundoff of the 4-bit matmul the trained (quantized) model runs on this CPU.

    bitsandbytes' CPU backend computes 4-bit layers in bf16 where the CPU has AVX512-BF16
    (bitsandbytes.backends.cpu.ops casts A and absmax to bf16) and in fp32 elsewhere, so the same test
    sees 7e-7 on one AMD EPYC and 1.7e-3 on another. The tolerance follows the precision in use.
    """
    from bitsandbytes.functional import has_avx512bf16

    return torch.finfo(torch.bfloat16 if has_avx512bf16() else torch.float32).eps


def test_qlora_merge_requantizes_like_training(qlora_dir, tmp_path):
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from lora_ns.inference import load

    quantized = load(str(qlora_dir))  # 4-bit base + adapter, as trained
    assert quantized.model.get_base_model().is_loaded_in_4bit
    trained = logits(quantized.model, quantized.tokenizer)

    with_round_trip = merge(str(qlora_dir), str(tmp_path / "rq"))
    without = merge(str(qlora_dir), str(tmp_path / "plain"), requantize=False)
    diff_rq = max_diff(logits(*load_merged(tmp_path / "rq")), trained)
    diff_plain = max_diff(logits(*load_merged(tmp_path / "plain")), trained)

    assert with_round_trip["requantized"] and with_round_trip["requantized_layers"] == 14  # 2 layers x 7 linears
    assert not without["requantized"]
    # Weight level, independent of the matmul kernel: every merged weight is the 4-bit weight the trained
    # model used (dequantized) plus the LoRA delta. One fp32 addition: error <= eps * |W| per element (x2 margin).
    merged = load_file(str(tmp_path / "rq" / "model.safetensors"))
    eps32 = torch.finfo(torch.float32).eps
    checked = 0
    for name, module in quantized.model.named_modules():
        if not hasattr(module, "get_delta_weight") or not hasattr(module.base_layer.weight, "quant_state"):
            continue
        weight = module.base_layer.weight
        used = bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        expected = used + module.get_delta_weight("default").float()
        key = name.replace("base_model.model.", "", 1) + ".weight"
        assert float((merged[key].float() - expected).abs().max()) <= 2 * eps32 * float(expected.abs().max()), key
        checked += 1
    assert checked == 14
    # Logit level: the requantized merge removes the 4-bit rounding error (diff_plain, ~5e-2 here) and
    # leaves only the trained model's kernel rounding: at most ~16 roundings along the path (2 layers x
    # 4 linears in series x input and output), x2 margin, relative to the logits' scale.
    scale = max(float(t.abs().max()) for t in trained)
    assert diff_rq < diff_plain / 10
    assert diff_rq < 32 * kernel_epsilon() * scale


def test_a_4bit_ia3_adapter_merges_through_the_round_trip(tmp_path, tiny_llama):
    """transformers' dequantize left the base flagged as loaded in 4-bit, and peft's IA3 merge refuses such a
    model: a ValueError where a LoRA adapter of the same recipe merged."""
    import yaml

    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe.update(peft={"method": "ia3"}, quantization={"load_in_4bit": True})
    (tmp_path / "ia3.yaml").write_text(yaml.safe_dump(recipe))
    adapter = make_adapter(tmp_path / "ia3", [], tmp_path / "ia3.yaml", "peft.init_ia3_weights=false")
    info = merge(str(adapter), str(tmp_path / "merged"))
    merged, tokenizer = load_merged(tmp_path / "merged")
    assert info["requantized"] and info["max_logit_diff_fp32"] < fp32_reassociation_tol(logits(merged, tokenizer))


def test_cli_saves_in_the_base_dtype(lora_dir, tiny_llama, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(bf16_base)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(bf16_base)

    assert main(["--adapter", str(lora_dir), "--output", str(tmp_path / "m"), "--base", str(bf16_base)]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "m" / "merge_info.json").read_text())["dtype"] == "bf16"


def test_refuses_a_non_empty_output_unless_overwrite(lora_dir, tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    argv = ["--adapter", str(lora_dir), "--output", str(target)]
    assert run_cli("lora_ns.merge", lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not empty" in err and "--overwrite" in err
    assert (target / "keep.txt").read_text() == "mine"

    assert main(argv + ["--dtype", "fp16", "--overwrite"]) == 0
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").is_file()
    assert json.loads((target / "merge_info.json").read_text())["dtype"] == "fp16"


def test_a_crash_while_saving_leaves_nothing_behind(lora_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def crash(self, folder, *args, **kwargs):
        (Path(folder) / "half-written.json").write_text("{")
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        merge(str(lora_dir), str(tmp_path / "new"))
    assert list(tmp_path.iterdir()) == []  # no target, no temporary folder

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        merge(str(lora_dir), str(old), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "keep.txt").read_text() == "mine"


def test_seq_cls_merge_keeps_the_trained_head_and_label_names(tmp_path, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lora_ns.inference import load

    recipe_file = tmp_path / "cls.yaml"
    recipe_file.write_text(
        "task: seq_cls\nmodel: {name_or_path: 'builtin:tiny-bert', dtype: fp32, labels: [negative, positive]}\n"
        "peft: {method: lora, r: 4, target_modules: [query, value]}\n"
        "dataset: {path: 'sample:glue_mrpc', formatter: glue_mrpc}\n", encoding="utf-8")
    adapter = make_adapter(tmp_path / "adapter", [], recipe_file)

    def unmerged():  # peft's model as trained (inference.load folds the adapter into the weights)
        base_model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        return PeftModel.from_pretrained(base_model, str(adapter)).eval()

    with torch.no_grad():  # a trained head differs from the base's random one
        adapter_model = unmerged()
        adapter_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    adapter_model.save_pretrained(adapter)

    merge(str(adapter), str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    loaded = load(str(adapter))
    batch = loaded.tokenizer(["a fine day", "the budget passed"], padding=True, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        expected, got, untuned = unmerged()(**batch).logits, merged(**batch).logits, base(**batch).logits
        folded = loaded.model(**batch.to(loaded.model.device)).logits.cpu()  # on cuda where there is one
    tol = fp32_reassociation_tol([expected])
    assert float((got - expected).abs().max()) < tol and float((folded - expected).abs().max()) < tol
    assert float((untuned - expected).abs().max()) > 100 * tol
    assert merged.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.parametrize("config, message", [(None, "no adapter_config.json"),
                                             ({"peft_type": "PREFIX_TUNING"}, "cannot be merged"),
                                             ("full", "holds a whole model (a full fine-tune)")])
def test_rejects_what_cannot_be_merged(tmp_path, capsys, config, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    if config == "full":  # a peft.method: full run saves the model itself
        (adapter / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif config:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    code = run_cli("lora_ns.merge", lambda: main(["--adapter", str(adapter), "--output", str(tmp_path / "o")]))
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError):
        merge(str(adapter), str(tmp_path / "o"))


def test_merged_model_stops_at_the_end_of_turn_it_was_trained_with(tiny_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"  # a base whose own eos is not ChatML's end of turn
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    adapter = make_adapter(tmp_path / "adapter", [f"model.name_or_path={base}", "model.chat_template=chatml"])
    merge(str(adapter), str(tmp_path / "merged"))
    saved = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (saved if isinstance(saved, list) else [saved])


def test_a_lora_bias_on_layers_without_one_is_used_unmerged_and_not_merged(tiny_llama, tmp_path, capsys):
    """peft cannot fold lora_bias into a layer that has no bias (llama's): merge refuses in one line, and
    inference (which folds fp32 adapters for speed) keeps this one apart and answers like the adapter model."""
    from lora_ns.inference import load

    adapter = make_adapter(tmp_path / "out", ["peft.lora_bias=true"])
    capsys.readouterr()
    code = run_cli("lora_ns.merge", lambda: main(["--adapter", str(adapter), "--output", str(tmp_path / "m")]))
    err = [line for line in capsys.readouterr().err.splitlines() if "lora_ns.merge" in line or "Error" in line]
    assert code == 2 and len(err) == 1 and "lora_bias on model.layers.0.self_attn.q_proj" in err[0], err
    assert not (tmp_path / "m").exists()
    loaded, unmerged = load(str(adapter)), load(str(adapter), merging=True)
    assert hasattr(loaded.model, "peft_config")  # not folded
    assert max_diff(logits(loaded.model, loaded.tokenizer), logits(unmerged.model, unmerged.tokenizer)) == 0
