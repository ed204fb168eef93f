"""Loss masks and packing, checked token by token on what TRL's SFTTrainer really builds from our datasets.

- single turn: prompt tokens are -100, the answer and its end-of-turn token are trained;
- multi turn: every assistant turn (content + <|im_end|>) is trained, nothing else;
- packing (bfd, padding-free): the same per-sample masks, and no sample attends to another (logits of a
  sample inside a packed row equal its logits alone, with sdpa attention);
- streaming and in-memory datasets give the same first tokenized batch.
"""

from __future__ import annotations

import pytest
import torch

from lora_ns.config import parse_recipe
from lora_ns.data import build_datasets, formatted_examples, sft_defaults

IM_END = "<|im_end|>"


def recipe(dataset: dict, model: str = "builtin:tiny-llama"):
    return parse_recipe({"model": {"name_or_path": model, "dtype": "fp32"}, "dataset": dataset})


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from lora_ns.model import load_tokenizer

    return load_tokenizer(recipe({"path": "sample:gsm8k", "formatter": "gsm8k"}))


def load_model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def model(tiny_llama):
    return load_model(tiny_llama)


def make_trainer(r, tok, model, out, packing: bool, max_length: int = 1024, batch: int = 4, **extra):
    from trl import SFTConfig, SFTTrainer

    train, _ = build_datasets(r, tok)
    args = SFTConfig(output_dir=str(out), max_steps=extra.pop("max_steps", 1), report_to="none", use_cpu=True,
                     bf16=False, packing=packing, packing_strategy="bfd", max_length=max_length,
                     per_device_train_batch_size=batch, save_strategy="no", **sft_defaults(r), **extra)
    return SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok)


def segments(dataset) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every sample, cutting packed rows at their seq_lengths."""
    out = []
    for row in dataset:
        cuts = row.get("seq_lengths") or [len(row["input_ids"])]
        start = 0
        for n in cuts:
            out.append((row["input_ids"][start:start + n], row["labels"][start:start + n]))
            start += n
    return out


def trained_spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of consecutive trained (label != -100) tokens."""
    spans, run = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token  # a trained position predicts its own token (the model shifts)
            run.append(token)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans + ([tok.decode(run)] if run else [])


def check_collated(trainer, dataset, packing: bool) -> torch.Tensor:
    """Collate the whole (small) dataset; labels are input_ids or -100, and never cross a sample boundary."""
    rows = list(dataset)
    batch = trainer.data_collator(rows)
    trained = batch["labels"] != -100
    assert torch.equal(batch["labels"][trained], batch["input_ids"][trained])
    if packing:  # padding-free: one flat row, position_ids restart at every sample
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert len(starts) == sum(len(r.get("seq_lengths", [1])) for r in rows)
        assert (batch["labels"][0, starts] == -100).all()
    else:
        assert not trained[batch["attention_mask"] == 0].any()
    return batch


# --- single turn -----------------------------------------------------------------------------------------

def expected_single_turn(tok, r) -> list[tuple[list[int], list[int], str]]:
    """(ids, labels, answer) computed directly from the chat template or the prompt template."""
    out = []
    for ex in formatted_examples(r):
        if r.dataset.prompt_template is None:
            user = [{"role": "user", "content": ex["prompt"]}]
            prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=True)
            full = tok.apply_chat_template(user + [{"role": "assistant", "content": ex["completion"]}],
                                           tokenize=True, return_dict=True)
            prompt, full = prompt["input_ids"], full["input_ids"]
        else:
            text = r.dataset.prompt_template.format(prompt=ex["prompt"])
            prompt = tok(text)["input_ids"]
            full = tok(text + ex["completion"] + tok.eos_token)["input_ids"]
        assert full[:len(prompt)] == prompt
        out.append((full, [-100] * len(prompt) + full[len(prompt):], ex["completion"]))
    return out


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("template", [None, "### Question:\n{prompt}\n### Answer:\n"], ids=["chat", "plain"])
def test_single_turn_trains_only_the_answer_and_its_eos(tok, model, tmp_path, packing, template):
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 8, "prompt_template": template})
    expected = expected_single_turn(tok, r)
    trainer = make_trainer(r, tok, model, tmp_path, packing)
    got = segments(trainer.train_dataset)
    want = [(ids, labels) for ids, labels, _ in expected]
    if packing:  # BFD reorders samples into bins
        assert len(trainer.train_dataset) < len(want)
        assert sorted(got) == sorted(want)
    else:
        assert got == want
    for ids, labels, answer in expected:
        spans = trained_spans(tok, ids, labels)
        assert len(spans) == 1 and spans[0].startswith(answer + IM_END)
        assert spans[0][len(answer + IM_END):].strip() == ""  # at most the template's newline after it
        assert tok.eos_token_id in [t for t, lab in zip(ids, labels) if lab != -100]
    batch = check_collated(trainer, trainer.train_dataset, packing)
    assert int((batch["labels"] != -100).sum()) == sum(sum(lab != -100 for lab in labels) for _, labels, _ in expected)


# --- multi turn -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_multi_turn_trains_every_assistant_turn_and_nothing_else(tok, model, tmp_path, packing):
    r = recipe({"path": "sample:code_feedback", "formatter": "code_feedback", "max_samples": 8,
                "system_prompt": "You review code."})
    examples = list(formatted_examples(r))
    by_ids = {}
    for ex in examples:
        messages = [{"role": "system", "content": "You review code."}] * (ex["messages"][0]["role"] != "system") + \
            ex["messages"]
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        by_ids[tuple(ids)] = messages
    trainer = make_trainer(r, tok, model, tmp_path, packing, max_length=2048)
    got = segments(trainer.train_dataset)
    assert sorted(tuple(ids) for ids, _ in got) == sorted(by_ids)
    for ids, labels in got:
        messages = by_ids[tuple(ids)]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(answers) >= 2
        assert trained_spans(tok, ids, labels) == [a + IM_END for a in answers]
        trained_text = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] not in trained_text
    check_collated(trainer, trainer.train_dataset, packing)


# --- packing does not leak attention across samples ------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama+lora"])
def test_packed_samples_do_not_attend_to_each_other(request, tok, tmp_path, arch):
    path = request.getfixturevalue("tiny_qwen2" if arch == "qwen2" else "tiny_llama")
    net = load_model(path).eval()
    if arch.endswith("lora"):
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 6},
               "builtin:tiny-qwen2" if arch == "qwen2" else "builtin:tiny-llama")
    from lora_ns.model import load_tokenizer

    trainer = make_trainer(r, load_tokenizer(r), net, tmp_path, packing=True, max_length=512)
    batch = trainer.data_collator(list(trainer.train_dataset))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) - 1 == 6
    with torch.no_grad():
        packed = net(**inputs).logits[0]
        naive = net(input_ids=batch["input_ids"]).logits[0]  # one causal sequence: samples see each other
        worst_packed = worst_naive = 0.0
        for a, b in zip(starts[:-1], starts[1:]):
            alone = net(input_ids=batch["input_ids"][:, a:b]).logits[0]
            worst_packed = max(worst_packed, (packed[a:b] - alone).abs().max().item())
            worst_naive = max(worst_naive, (naive[a:b] - alone).abs().max().item())
    # Packed and alone run the same fp32 math on differently shaped tensors, so only the reduction order
    # differs: <= K * eps relative per dot product (K <= 128, the tiny model's widest layer), compounded over
    # 2 layers x 4 matmuls in series: 8 * 128 * eps ~ 1.2e-4 of the logits' scale, on any CPU.
    scale = max(1.0, float(naive.abs().max()))
    assert worst_packed < 8 * 128 * torch.finfo(torch.float32).eps * scale
    assert worst_naive > 1e-3  # the comparison can see leakage when there is some


def test_packed_training_runs_and_the_loss_goes_down(tok, tiny_llama, tmp_path):
    """Packed rows differ in length and content, so the run is compared with an lr-0 control that sees the
    same rows in the same order: their losses differ only by what was learned (6 steps at 3e-3 learn ~0.8
    nats over the last two steps; lr 0 learns exactly 0), so 0.1 nats is a real margin."""
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 8})

    def run(learning_rate: float, out) -> list[float]:
        trainer = make_trainer(r, tok, load_model(tiny_llama), out, packing=True, max_length=256, batch=1,
                               max_steps=6, learning_rate=learning_rate, lr_scheduler_type="constant",
                               logging_steps=1, seed=0)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    losses, control = run(3e-3, tmp_path / "run"), run(0.0, tmp_path / "control")
    assert len(losses) == len(control) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == control[0], (losses, control)  # same first row from the same start
    assert sum(losses[-2:]) / 2 < sum(control[-2:]) / 2 - 0.1, (losses, control)


# --- streaming ------------------------------------------------------------------------------------------------

def test_streaming_and_in_memory_give_the_same_first_tokenized_batch(tok, model, tmp_path):
    base = {"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 12}
    eager = make_trainer(recipe(base), tok, model, tmp_path / "eager", packing=False)
    streamed = make_trainer(recipe({**base, "streaming": True}), tok, model, tmp_path / "stream", packing=False)
    import datasets

    assert isinstance(streamed.train_dataset, datasets.IterableDataset)
    first_eager = [eager.train_dataset[i] for i in range(4)]
    first_stream = [row for row, _ in zip(streamed.train_dataset, range(4))]
    a, b = eager.data_collator(first_eager), streamed.data_collator(first_stream)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (a["labels"] != -100).any() and (a["labels"] == -100).any()
