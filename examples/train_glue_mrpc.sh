#!/usr/bin/env bash
# GLUE MRPC paraphrase detection: sentence-pair classification, LoRA (r=8) on RoBERTa-base.
# Hardware: one GPU with 8 GB or more (125M-param fp32 base, batch 32, short sentences); a few minutes an epoch.
# A CPU also works for a try-out (slow): add training.max_steps=50.
# Then: python -m lora_ns.evaluate recipes/glue_mrpc.yaml --adapter outputs/glue_mrpc   (accuracy / F1)
# Extra arguments are recipe overrides, e.g.  examples/train_glue_mrpc.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/glue_mrpc.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/glue_mrpc.yaml "$@"
