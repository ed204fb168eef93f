#!/usr/bin/env bash
# After training: ask the tuned model, batch a file of prompts, evaluate, merge, and compare with the base.
#   examples/run_inference.sh [ADAPTER_DIR]        (default: outputs/quickstart, from examples/train_quickstart.sh)
# Offline and CPU-friendly with the quickstart adapter (tiny random model: the answers are not meant to be good).
# Re-running replaces this script's own outputs (it passes --overwrite); everything goes next to the adapter.
set -euo pipefail
cd "$(dirname "$0")/.."   # recipe paths (and outputs/) are relative to the repository root
ADAPTER="${1:-outputs/quickstart}"
MERGED="${ADAPTER%/}-merged"
if [ ! -f "$ADAPTER/adapter_config.json" ]; then
  echo "no adapter in $ADAPTER: train one first, e.g. examples/train_quickstart.sh" >&2
  exit 2
fi
QUESTIONS="$(mktemp --suffix=.txt)"
trap 'rm -f "$QUESTIONS"' EXIT
printf '%s\n' "Ben has 33 stickers and gives away 27. How many stickers are left?" \
  "A box of cookies costs \$45. Chloe buys 3 boxes. How much does Chloe spend?" > "$QUESTIONS"

echo "== one prompt (greedy)"
python -m lora_ns.infer --model "$ADAPTER" --greedy --max-new-tokens 64 \
  --prompt "Ava buys 23 apples on Monday and 4 times as many on Tuesday. How many apples does Ava have?"

echo "== a file of prompts -> $ADAPTER/answers.jsonl"
python -m lora_ns.infer --model "$ADAPTER" --input-file "$QUESTIONS" --output-file "$ADAPTER/answers.jsonl" \
  --batch-size 4 --max-new-tokens 64 --overwrite

echo "== evaluate on the recipe's held-out rows -> $ADAPTER/eval/"
python -m lora_ns.evaluate "$ADAPTER/recipe.yaml" --adapter "$ADAPTER" --max-new-tokens 64 --overwrite

echo "== merge into the base -> $MERGED (logit check printed)"
python -m lora_ns.merge --adapter "$ADAPTER" --output "$MERGED" --overwrite

echo "== the merged model answers like the adapter"
python -m lora_ns.infer --model "$MERGED" --greedy --max-new-tokens 64 --input-file "$QUESTIONS"

echo "== base vs tuned, side by side"
python -m lora_ns.infer --compare --model "$ADAPTER" --input-file "$QUESTIONS" --max-new-tokens 64
