"""Every peft method (and full fine-tuning) trains a few steps on the tiny Llama and lowers the loss.

Each run overfits one fixed batch (8 rows, batch size 8) so that the first and last logged losses
are comparable; the learning rates are high because the model is random and the runs are short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_ns.config import parse_recipe

STEPS = 12


def causal_recipe(out: Path, method: str, model: str = "builtin:tiny-llama", training: dict | None = None,
                  max_samples: int | None = 8, **peft):
    return parse_recipe({
        "task": "causal_lm",
        "model": {"name_or_path": model, "dtype": "fp32"},
        "peft": {"method": method, **peft},
        "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": max_samples},
        "training": {"output_dir": str(out), "max_steps": STEPS, "per_device_train_batch_size": 8,
                     "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "max_length": 128, "seed": 0, "report_to": "none", "save_strategy": "no",
                     **(training or {})},
    }, source="test.yaml")


# name -> (peft.method, learning rate, peft fields)
METHODS = {
    "lora": ("lora", 1e-2, {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}),
    "dora": ("lora", 1e-2, {"r": 8, "lora_alpha": 16, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}),
    "rslora": ("lora", 1e-2, {"r": 8, "lora_alpha": 16, "use_rslora": True}),
    "prefix": ("prefix_tuning", 3e-2, {"num_virtual_tokens": 8}),
    "prompt_text": ("prompt_tuning", 3e-2, {"num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
                                            "prompt_tuning_init_text": "Let's think step by step."}),
    "ia3": ("ia3", 5e-2, {}),
    "adalora": ("adalora", 1e-2, {"init_r": 8, "target_r": 4, "tinit": 2, "tfinal": 2, "deltaT": 2}),
    "full": ("full", 5e-3, {}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_loss_goes_down(name, tmp_path, tiny_llama, capsys):
    from lora_ns.train import train

    method, lr, peft = METHODS[name]
    summary = train(causal_recipe(tmp_path / "out", method, training={"learning_rate": lr}, **peft))
    assert summary["steps"] == STEPS
    assert summary["last_loss"] < summary["first_loss"] - 0.02, summary
    assert "trainable params:" in capsys.readouterr().out
    out = tmp_path / "out"
    assert not list(out.glob("*model*.bin"))  # weights only as safetensors
    if method == "full":
        assert (out / "model.safetensors").is_file()
        assert summary["trainable_params"] == summary["total_params"]
    else:
        assert (out / "adapter_model.safetensors").is_file()
        assert 0 < summary["trainable_params"] < summary["total_params"]
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["peft_type"].lower().replace("_", "") == method.replace("_", "")
        if name == "dora":
            assert config["use_dora"] is True
        if name == "rslora":
            assert config["use_rslora"] is True
        if name == "prompt_text":
            assert config["tokenizer_name_or_path"] == tiny_llama
        from lora_ns.adapters import prefix_generation_problem
        from lora_ns.errors import UserError
        from lora_ns.inference import generate, load  # every adapter trained here also loads for inference

        loaded = load(str(out))
        if method == "prefix_tuning" and prefix_generation_problem():  # these peft/transformers: see adapters
            with pytest.raises(UserError, match="cannot generate with a prefix-tuning adapter"):
                generate(loaded, ["What is 2+2?"], max_new_tokens=4)
            return
        (reply,) = generate(loaded, ["What is 2+2?"], max_new_tokens=4)
        assert isinstance(reply, str)
        if method in ("prefix_tuning", "prompt_tuning"):  # batched (left-padded) = one prompt at a time
            prompts = ["What is 2+2?", "Natalia sold clips to 48 of her friends in April. How many in May?"]
            alone = [generate(loaded, [p], max_new_tokens=6)[0] for p in prompts]
            assert generate(loaded, prompts, max_new_tokens=6) == alone


def test_adalora_budget_follows_trainer_steps_without_max_steps(tmp_path, tiny_llama):
    """No max_steps: total_step comes from the trainer's step count, and ranks get allocated (callback ran)."""
    from lora_ns.train import train

    recipe = causal_recipe(tmp_path / "out", "adalora", init_r=8, target_r=2, tinit=1, tfinal=2, deltaT=1,
                           max_samples=None, training={"max_steps": -1, "num_train_epochs": 1})
    summary = train(recipe)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["total_step"] == summary["steps"] == 5  # 40 sample rows / batch 8
    ranks = [sum(mask) for mask in config["rank_pattern"].values()]
    assert ranks and min(ranks) < 8  # update_and_allocate pruned ranks below init_r


def test_lora_on_qwen2(tmp_path, tiny_qwen2):
    from lora_ns.train import train

    summary = train(causal_recipe(tmp_path / "out", "lora", model="builtin:tiny-qwen2", r=8,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert summary["last_loss"] < summary["first_loss"] - 0.02, summary


def test_prompt_tuning_init_is_read_as_peft_spells_it(tmp_path, tiny_llama):
    """peft compares the init with its upper-case enum: "text" (or a word it lacks) initialised at random."""
    from peft import PromptTuningInit

    from lora_ns.adapters import peft_config
    from lora_ns.errors import UserError
    from lora_ns.setup import Checks, setup

    def recipe(init: str):
        return causal_recipe(tmp_path / "out", "prompt_tuning", num_virtual_tokens=8, prompt_tuning_init=init,
                             prompt_tuning_init_text="Think.")

    assert peft_config(recipe("text")).prompt_tuning_init == PromptTuningInit.TEXT
    with pytest.raises(UserError, match=r"peft.prompt_tuning_init: .*'bogus' is none of peft's TEXT"):
        setup(recipe("bogus"), dry_run=True, checks=Checks(model=False))


def test_the_prefix_generation_probe_tells_what_generate_does(tiny_llama):
    """The probe passes a model that generates as it scores; its verdict on prefix tuning matches what
    generate does: where it finds a problem, a prefix-tuned model generates exactly as its base does."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_ns.adapters import generates_as_it_scores, prefix_generation_problem

    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert generates_as_it_scores(base)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        plain = base.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        torch.manual_seed(0)
        tuned = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)).eval()
        prefixed = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False)
        scored = tuned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
    if prefix_generation_problem():
        # the prefix changes the scores only: the base's first token scores ~0.5 below the prefixed model's best
        # (top two ~0.01 apart: whichever wins on this CPU, neither is the base's)
        assert torch.equal(prefixed, plain) and prefixed[0, 4] != scored
    else:
        assert prefixed[0, 4] == scored


def test_prompt_tuning_generates_what_its_forward_pass_picks(tiny_llama):
    """peft's cached generation steps give transformers 5 positions without the virtual tokens, so later
    tokens were scored ~0.1 logit off the forward pass training ran; lora_ns generates uncached for them."""
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_ns.inference import Loaded, generate, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)).eval()
    prompt = render_prompt(tokenizer, "What is 2+2?")
    ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt")["input_ids"]
    picked = ids
    with torch.no_grad():
        for _ in range(12):  # greedy by whole forward passes, as training scores
            token = model(input_ids=picked, attention_mask=torch.ones_like(picked)).logits[0, -1].argmax()
            picked = torch.cat([picked, token.view(1, 1)], dim=1)
            if token == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(picked[0, ids.shape[1]:], skip_special_tokens=True).strip()
    loaded = Loaded(model, tokenizer, "causal_lm", "adapter")
    assert generate(loaded, ["What is 2+2?"], max_new_tokens=12, progress=False) == [expected]
