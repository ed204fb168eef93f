#!/usr/bin/env bash
# Code-Feedback: multi-turn coding conversations, loss on every assistant turn; LoRA on Qwen2.5-Coder-1.5B, bf16.
# Hardware: one GPU with 24 GB or more (bf16 base ~3 GB; batch 4 x 2048 tokens with gradient checkpointing).
# Less memory: training.max_length=1024, or use 4-bit: quantization.load_in_4bit=true peft.method=qlora.
# Extra arguments are recipe overrides, e.g.  examples/train_code_feedback.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/code_feedback.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/code_feedback.yaml "$@"
