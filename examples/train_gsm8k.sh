#!/usr/bin/env bash
# GSM8K grade-school math with QLoRA: Qwen2.5-1.5B-Instruct in 4-bit NF4, LoRA on every linear layer.
# Hardware: one GPU with 16-24 GB (4-bit base ~1.2 GB; batch 8 x 1024 tokens with gradient checkpointing).
# bitsandbytes 4-bit needs a CUDA GPU for speed (it runs on CPU, but far too slowly for the full set).
# Then: python -m lora_ns.evaluate recipes/gsm8k.yaml --adapter outputs/gsm8k   (exact match on the final number)
# Extra arguments are recipe overrides, e.g.  examples/train_gsm8k.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/gsm8k.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/gsm8k.yaml "$@"
