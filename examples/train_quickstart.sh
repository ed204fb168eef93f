#!/usr/bin/env bash
# The embedded default: a tiny random Llama (builtin:tiny-llama) learns the bundled GSM8K sample.
# Hardware: none needed - runs offline on a laptop CPU in about a minute, < 1 GB RAM; a GPU is used if present.
# Writes outputs/quickstart/ (adapter, loss_curve.png, summary.txt); a finished run there is never overwritten:
# pass training.overwrite_output_dir=true to train again.
# Extra arguments are recipe overrides, e.g.  examples/train_quickstart.sh training.max_steps=100 --peft.r 32
# More GPUs: see examples/train_multi_gpu.sh and accelerate_configs/ (accelerate launch --config_file ...).
# Check it first, without a GPU:  python -m lora_ns.validate recipes/quickstart.yaml
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
exec accelerate launch -m lora_ns.train recipes/quickstart.yaml "$@"
