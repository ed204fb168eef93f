"""The speed default for SFT without packing: rows are grouped by length (``train_sampling_strategy:
group_by_length``), so a batch pads to a length close to each of its rows. It must not change the loss:
a padded batch gives exactly the per-token loss of its rows trained alone, unpadded
(bench/README.md has the measurements that chose it).
"""

from __future__ import annotations

import pytest
import torch

from lora_ns.config import parse_recipe
from lora_ns.setup import training_arguments


def recipe(out, model: dict | None = None, dataset: dict | None = None, task: str = "causal_lm", **training):
    model = {"name_or_path": "builtin:tiny-llama", "dtype": "fp32", **(model or {})}
    return parse_recipe({"task": task, "model": model,
                         "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k", **(dataset or {})},
                         "training": {"output_dir": str(out), **training}})


def strategy(r) -> str:
    return training_arguments(r).train_sampling_strategy


def test_sft_groups_by_length_unless_packing_streaming_or_the_recipe_says(tmp_path):
    assert strategy(recipe(tmp_path)) == "group_by_length"
    # flash attention packs (bfd, padding-free): nothing left to group
    flash = training_arguments(recipe(tmp_path, model={"attn_implementation": "flash_attention_2"}))
    assert flash.packing and flash.train_sampling_strategy == "random"
    assert strategy(recipe(tmp_path, packing=True)) == "random"
    assert strategy(recipe(tmp_path, dataset={"streaming": True})) == "random"  # no lengths to group by
    assert strategy(recipe(tmp_path, train_sampling_strategy="random")) == "random"  # the recipe wins
    pairs = {"path": "sample:glue_mrpc", "formatter": "glue_mrpc"}
    assert strategy(recipe(tmp_path, model={"name_or_path": "builtin:tiny-bert"}, dataset=pairs,
                           task="seq_cls")) == "random"


def test_every_process_reads_a_stream_beside_the_recipes_accelerate_options(tmp_path):
    """Dispatched batches of a stream stop a multi-process run (tests/test_distributed.py); a recipe's own
    accelerator_config replaced ours whole."""
    streamed = training_arguments(recipe(tmp_path, dataset={"streaming": True},
                                         accelerator_config={"even_batches": False})).accelerator_config
    assert streamed.dispatch_batches is False and streamed.even_batches is False


def row_alone_nll(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over the trained positions of one unpadded row, and their count."""
    logits = model(input_ids=ids[None]).logits[0, :-1]
    target = labels[1:]
    keep = target != -100
    nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
    return float(nll), int(keep.sum())


def test_grouped_padded_batches_give_the_loss_of_each_row_alone(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import SFTTrainer

    from lora_ns.data import build_datasets
    from lora_ns.model import load_tokenizer

    r = recipe(tmp_path, dataset={"max_samples": 24}, per_device_train_batch_size=4, max_steps=1,
               report_to="none")
    tok = load_tokenizer(r)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # sharper logits: per-token losses differ between rows (random init: ~uniform)
        model.lm_head.weight *= 30  # and a per-row mean of means would no longer pass for the per-token mean
    train, _ = build_datasets(r, tok)
    trainer = SFTTrainer(model=model, args=training_arguments(r), train_dataset=train, processing_class=tok)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)  # the default reaches the Trainer
    model.eval()
    padded_batches = 0
    with torch.no_grad():
        for batch in trainer.get_train_dataloader():
            mask = batch["attention_mask"].bool()
            padded_batches += int((~mask).any())
            loss = float(trainer.compute_loss(model, dict(batch)))
            alone = [row_alone_nll(model, batch["input_ids"][i][mask[i]], batch["labels"][i][mask[i]])
                     for i in range(len(mask))]
            expected = sum(n for n, _ in alone) / sum(c for _, c in alone)
            # Same fp32 math on differently shaped tensors: only reduction order differs, <= K * eps relative
            # per dot product (K <= 128, the model's widest layer) over 2 layers x 4 matmuls in series, on the
            # logits' scale; the log-softmax and the target logit each pass that error on at most once (x2).
            scale = max(1.0, float(model(input_ids=batch["input_ids"]).logits.abs().max()))
            assert loss == pytest.approx(expected, abs=2 * 8 * 128 * torch.finfo(torch.float32).eps * scale)
    assert padded_batches > 0  # the comparison did go through padding


def test_training_on_cuda_with_sdpa_leaves_out_cudnn_attention(tmp_path, monkeypatch):
    """cuDNN's attention builds a plan per new sequence length; length-grouped batches bring one nearly
    every step (an H100 idled 87% of a 1.5B LoRA step: bench/README.md, "GPU"). Eager keeps the setting."""
    from lora_ns.train import avoid_cudnn_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        avoid_cudnn_attention(recipe(tmp_path, model={"attn_implementation": "eager"}))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        avoid_cudnn_attention(recipe(tmp_path))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_selective_checkpointing_trains_under_a_peft_adapter(tmp_path):
    """TRL's selective checkpointing (``gradient_checkpointing_kwargs: {selective: true}``: the attention output
    is saved, not recomputed) under lora_ns's peft adapter: torch used to refuse TRL's key at the first step.
    It now reaches the decoder layers and trains to the same losses as full checkpointing."""
    from lora_ns.train import run_training

    def run(out, **training) -> tuple[list[float], object]:
        r = recipe(out, max_steps=3, per_device_train_batch_size=4, logging_steps=1, report_to="none",
                   gradient_checkpointing=True, **training)
        trainer, _ = run_training(r)
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer

    full, _ = run(tmp_path / "full")
    selective, trainer = run(tmp_path / "selective", gradient_checkpointing_kwargs={"selective": True})
    layer = trainer.model.get_base_model().model.layers[0]
    assert layer._gradient_checkpointing_func.keywords.get("context_fn") is not None  # TRL's policy is on
    # Saving an op's output instead of recomputing it runs the same kernels on the same inputs, in the same
    # order, on one CPU thread pool: bit-identical losses, not merely close ones.
    assert len(full) == 3 and selective == full


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA TRL scores label positions only itself")
def test_cpu_training_scores_label_positions_only_with_the_same_loss_and_gradients(tiny_llama, tmp_path,
                                                                                     monkeypatch):
    """TRL's fused LM head scores every position off Triton devices (prompt and padding too); lora_ns's
    training set-up makes it score only the positions with a label on the CPU, which must change nothing
    but the work: the head sees mask.sum() rows, and the loss and every gradient are those of all positions."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from lora_ns.data import build_datasets
    from lora_ns.model import load_tokenizer
    from lora_ns.train import score_label_positions_only

    r = recipe(tmp_path, dataset={"max_samples": 8}, per_device_train_batch_size=8, max_steps=1,
               report_to="none")
    tok, args = load_tokenizer(r), training_arguments(r)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=build_datasets(r, tok)[0], processing_class=tok)
    batch = dict(next(iter(trainer.get_train_dataloader())))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert labelled < batch["labels"][:, 1:].numel()  # prompts (and padding) carry no label

    rows, chunked = [], trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", type("Recorder", (), {"apply": staticmethod(
        lambda hidden, *rest: rows.append(hidden.shape[0]) or chunked.apply(hidden, *rest))}))
    from trl.kernels.chunked_logprob import _use_triton as trl_decides  # TRL's own, should a run have patched

    monkeypatch.setattr(trl_utils, "_use_triton", trl_decides)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    every_loss, every_grad = loss_and_grads()
    score_label_positions_only(args)
    labelled_loss, labelled_grad = loss_and_grads()
    assert rows == [batch["labels"][:, 1:].numel(), labelled]
    # The same fp32 dot products of width 64 (hidden) per logit, only blocked differently by the matmul of
    # fewer rows: <= 64 * eps relative on each logit, passed once through the log-softmax (x2).
    tol = 2 * 64 * torch.finfo(torch.float32).eps
    assert labelled_loss == pytest.approx(every_loss, rel=tol)
    for name, grad in every_grad.items():
        scale = float(grad.abs().max()) or 1.0
        assert torch.allclose(labelled_grad[name], grad, rtol=0, atol=tol * scale), name
