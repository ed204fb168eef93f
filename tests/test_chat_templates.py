"""Named training templates (model.chat_template: chatml): the loss mask marks exactly the assistant replies,
validate refuses a template TRL cannot mark, and a chat recipe trains with it."""

from __future__ import annotations

import pytest

from conftest import REPO
from lora_ns.config import load_recipe
from lora_ns.errors import UserError

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "It is 6."}]
PLAIN_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_recipe(tmp_path, *overrides: str):
    return load_recipe(REPO / "recipes" / "code_feedback.yaml", [
        "model.name_or_path=builtin:tiny-llama", "model.dtype=fp32", "quantization.load_in_4bit=false",
        "peft.method=lora", "dataset.path=sample:code_feedback", "training.bf16=false",
        f"training.output_dir={tmp_path / 'out'}", *overrides])


def test_chatml_marks_exactly_the_assistant_replies_and_their_end_of_turn(tiny_llama, tmp_path):
    from lora_ns.model import load_tokenizer

    tokenizer = load_tokenizer(chat_recipe(tmp_path, "model.chat_template=chatml"))
    enc = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(marked) == "4<|im_end|>It is 6.<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>"  # what training teaches is what generation stops on
    # prefix-preserving: the first turns render the same whatever follows
    first = tokenizer.apply_chat_template(CHAT[:3], tokenize=False)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False).startswith(first)


def test_validate_refuses_a_template_that_cannot_mark_assistant_turns(tiny_llama, tmp_path):
    from lora_ns.setup import setup

    recipe = chat_recipe(tmp_path, f"model.chat_template={PLAIN_CHATML}")
    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    assert "model.chat_template" in str(err.value) and "chatml" in str(err.value)
    setup(chat_recipe(tmp_path, f"model.chat_template={PLAIN_CHATML}", "training.assistant_only_loss=false"),
          dry_run=True)  # the documented way out: train on every token


NO_SYSTEM_ROLE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                  "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
                  "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_template_text_longer_than_a_file_name_is_read_as_the_template(tmp_path):
    """Checking whether the text named a file raised "File name too long" (a traceback) past 255 bytes."""
    from lora_ns.model import chat_template_text

    assert len(NO_SYSTEM_ROLE.encode()) > 255
    assert chat_template_text(chat_recipe(tmp_path, f"model.chat_template={NO_SYSTEM_ROLE}")) == NO_SYSTEM_ROLE


def test_a_conversation_the_template_refuses_is_an_error_at_its_row_not_a_traceback(tiny_llama, tmp_path):
    """Gemma's template raises on a system turn (Mistral's on roles out of turn): TRL's tokenization stopped
    with jinja's traceback, after validate had passed. validate names the row; past its sample, train's
    tokenization says it in one line, before any step."""
    from lora_ns.setup import Checks, setup
    from lora_ns.train import run_training

    recipe = chat_recipe(tmp_path, f"model.chat_template={NO_SYSTEM_ROLE}", "dataset.system_prompt=Be brief.",
                         "training.max_steps=1")
    with pytest.raises(UserError) as err:
        setup(recipe, dry_run=True)
    (problem,) = err.value.problems
    assert (problem.line, problem.field) == (1, "messages") and problem.file.endswith("code_feedback.jsonl")
    assert "the chat template refuses this conversation: System role not supported" in problem.message
    assert "remove dataset.system_prompt" in problem.fix
    with pytest.raises(UserError, match="refuses a conversation in the data: System role not supported"):
        run_training(recipe, Checks(data=False))  # as a row validate did not sample
    assert not (tmp_path / "out" / "run_summary.json").exists()


def test_a_multi_turn_recipe_trains_with_the_named_template(tiny_llama, tmp_path):
    import math

    from lora_ns.train import train

    summary = train(chat_recipe(tmp_path, "model.chat_template=chatml", "training.max_steps=2",
                                "training.logging_steps=1", "training.save_strategy=no"))
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])


def test_an_unknown_template_name_is_not_mistaken_for_template_text(tmp_path):
    from lora_ns.model import chat_template_text

    with pytest.raises(UserError, match="not found"):
        chat_template_text(chat_recipe(tmp_path, "model.chat_template=templates/missing.jinja"))
    # a mistyped name became template text without Jinja: every row rendered as "chatm1", no loss token left
    with pytest.raises(UserError, match="'chatm1' is no template name, file or Jinja text — did you mean 'chatml'"):
        chat_template_text(chat_recipe(tmp_path, "model.chat_template=chatm1"))


def test_show_sample_marks_exactly_the_completion_on_the_bundled_sample(tiny_llama, tmp_path):
    from lora_ns.data import formatted_examples
    from lora_ns.validate.sample import marked_text, training_rows

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", [f"training.output_dir={tmp_path / 'out'}"])
    rows = training_rows(recipe, 3)
    first_rows = load_recipe(REPO / "recipes" / "quickstart.yaml", ["dataset.val_split=null"])
    expected = list(formatted_examples(first_rows, limit=3))  # the sample's first rows, as shown
    assert len(rows) == 3
    for row, example in zip(rows, expected):
        tokenizer = row["tokenizer"]
        loss_text = tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
        # the completion and its end of turn (so the model learns to stop), nothing of the prompt
        assert loss_text.strip() == example["completion"].strip() + "<|im_end|>"
        assert example["prompt"] not in loss_text
        assert marked_text(row, colour=False).count("[[") == 1


def test_a_base_trained_with_chatml_saves_a_generation_config_that_stops_at_end_of_turn(tiny_llama, tmp_path):
    import json
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    from lora_ns.config import PeftSection
    from lora_ns.train import train

    base = tmp_path / "base"  # a base model whose own eos is not ChatML's end of turn
    shutil.copytree(tiny_llama, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(base)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    recipe = chat_recipe(tmp_path, f"model.name_or_path={base}", "model.chat_template=chatml",
                         "training.max_steps=1", "training.save_strategy=no")
    recipe.peft = PeftSection(method="full")  # a full model saves its generation config (TRL aligns its eos)
    train(recipe)
    saved = json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in (saved if isinstance(saved, list) else [saved])
