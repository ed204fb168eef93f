"""The ceiling: one forward + backward of a real-shape model in a bare torch loop, no Trainer, no TRL.

    python bench/gpu_probe.py --out DIR                 # on the GPU machine (Qwen2.5-1.5B shape, bf16)
    python bench/gpu_probe.py --device cpu --tiny       # the same code on CPU, tiny shape (seconds)

bench/gpu.sh's Trainer runs measured 5.9% MFU on the 1.5B shape, trl and lora_ns alike. This script
separates what the model costs from what the training stack around it costs: a bf16 matmul's TFLOPS
(the achievable peak), then tokens/s of forward + backward for full fine-tuning and for LoRA r16
all-linear in the ways the stack may run it (peft's fp32 adapters or bf16 ones, under autocast or not,
full or padded batches, gradient checkpointing, TRL's fused LM head). Prints one line per case and
writes OUT/gpu_probe.json. MFU here is 6 N tokens/s / peak, as in bench/gpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import SHAPES, TINY  # noqa: E402  (the same architecture configs as the bench)


def seconds_per_call(fn: Callable[[], Any], device: str, warmup: int = 2, iters: int = 5) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def matmul_tflops(device: str, dtype, tiny: bool) -> float:
    import torch

    m, k, n = (256, 64, 128) if tiny else (8192, 1536, 8960)
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    return 2 * m * k * n / seconds_per_call(lambda: a @ b, device, 3, 20) / 1e12


def batch(vocab: int, rows: int, length: int, device: str, padded: bool) -> dict[str, Any]:
    """Random ids; `padded`: row lengths spread over 16..length, right-padded, labels -100 on padding."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for i, n in enumerate(torch.randint(16, length + 1, (rows,), generator=g).tolist()):
            mask[i, n:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train_step(model, inputs: dict[str, Any], autocast: bool, fused: bool) -> Callable[[], None]:
    import torch

    def step() -> None:
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = model(**inputs, fused_lm_head=True) if fused else model(**inputs)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None
    return step


CASES = [("full fine-tune (all grads)", {"lora": False}),
         ("lora, peft default (fp32 adapters)", {"lora": True}),
         ("lora, fp32 adapters, autocast bf16", {"lora": True, "autocast": True}),
         ("lora, bf16 adapters", {"lora": True, "bf16_adapters": True}),
         ("lora, padded batch 16..max", {"lora": True, "padded": True}),
         ("lora, gradient checkpointing", {"lora": True, "checkpointing": True}),
         ("lora, TRL fused LM head", {"lora": True, "fused": True}),
         ("lora, fused head + autocast", {"lora": True, "fused": True, "autocast": True})]


def run_case(config, case: dict[str, Any], args, dtype) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if case.get("fused"):
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    if case.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if case["lora"]:
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear"),
                               autocast_adapter_dtype=not case.get("bf16_adapters"))
    model.train()
    inputs = batch(config.vocab_size, args.batch, args.length, args.device, case.get("padded", False))
    seconds = seconds_per_call(train_step(model, inputs, case.get("autocast", False), case.get("fused", False)),
                               args.device, iters=args.iters)
    real = int(inputs["attention_mask"].sum())
    out = {"s_per_step": seconds, "tokens_per_s": real / seconds, "padded_tokens_per_s": inputs["input_ids"].numel()
           / seconds}
    if args.device == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/gpu_probe.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100/H200 dense bf16")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if args.tiny:
        args.batch, args.length, args.iters = 2, 64, 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = Qwen2Config(**{**SHAPES[args.shape], **(TINY if args.tiny else {})})
    with torch.device("meta"):  # every parameter, for 6N (no weights made)
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    results: dict[str, Any] = {"shape": args.shape, "batch": args.batch, "length": args.length,
                               "matmul_tflops": matmul_tflops(args.device, dtype, args.tiny), "cases": {}}
    print(f"matmul {results['matmul_tflops']:.0f} TFLOPS ({dtype})", flush=True)
    for name, case in CASES:
        try:
            record = run_case(config, case, args, dtype)
        except Exception as err:  # one failing case must not cost the others' figures
            record = {"error": f"{type(err).__name__}: {err}"[:300]}
        if "tokens_per_s" in record:
            record["mfu_padded"] = 6 * n_params * record["padded_tokens_per_s"] / (args.peak_tflops * 1e12)
        results["cases"][name] = record
        print(f"{name:40s} " + (record["error"] if "error" in record else
              f"{record['s_per_step'] * 1000:8.1f} ms/step {record['tokens_per_s']:9.0f} tok/s "
              f"MFU(padded) {record['mfu_padded']:.1%} "
              f"{record.get('max_allocated_gib', 0):.1f} GiB"), flush=True)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_probe.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
