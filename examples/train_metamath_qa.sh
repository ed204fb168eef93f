#!/usr/bin/env bash
# MetaMathQA (first 100k of 395k rows): LoRA (r=32, all linear layers) on Qwen2.5-0.5B in bf16.
# Hardware: one GPU with 24-40 GB (batch 16 x 1024 tokens without gradient checkpointing); needs bf16 (Ampere or newer).
# Less memory: training.gradient_checkpointing=true or training.per_device_train_batch_size=8 training.gradient_accumulation_steps=2.
# Extra arguments are recipe overrides, e.g.  examples/train_metamath_qa.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/metamath_qa.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/metamath_qa.yaml "$@"
