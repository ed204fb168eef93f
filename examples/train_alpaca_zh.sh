#!/usr/bin/env bash
# Alpaca-zh: Chinese instruction following with LoRA on Qwen2.5-1.5B-Instruct in bf16.
# Hardware: one GPU with 24-40 GB (batch 8 x 1024 tokens, no gradient checkpointing).
# 16 GB: add training.gradient_checkpointing=true, or training.per_device_train_batch_size=4 training.gradient_accumulation_steps=4.
# Extra arguments are recipe overrides, e.g.  examples/train_alpaca_zh.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/alpaca_zh.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/alpaca_zh.yaml "$@"
