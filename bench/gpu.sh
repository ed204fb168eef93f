#!/usr/bin/env bash
# The GPU bench in one call (see bench/gpu.py and bench/README.md, "GPU").
#   bash bench/gpu.sh                        # GPU machine: carried wheels in .whl/, results in $OUT
#   bash bench/gpu.sh --device cpu --tiny    # dry run of the same path on CPU
# The GPU machine has torch, transformers, peft and accelerate but no trl/datasets/bitsandbytes and no
# network: the wheels in .whl/ (python bench/gpu.py --prepare-wheels .whl) are installed without deps.
set -euo pipefail
START=$SECONDS
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_S="${GPU_BENCH_TOTAL_S:-450}"   # the whole script, install included: one call is at most 8 minutes
[[ " $* " == *" --tiny "* ]] && TOTAL_S="${GPU_BENCH_TOTAL_S:-1800}"  # the dry run only checks the path
if [[ " $* " != *" --device cpu "* ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --no-deps --no-index .whl/*.whl \
      || echo "wheel install failed: the runs that need them will report it" >&2
  else
    echo "no .whl/*.whl to install; using what is installed" >&2
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export LORA_NS_CACHE="${LORA_NS_CACHE:-${TMPDIR:-/tmp}/lora_ns_cache}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
BUDGET=$(( TOTAL_S - (SECONDS - START) - 20 ))
exec "$PY" bench/gpu.py --out "$OUT" --budget-s "$BUDGET" "$@"
