#!/usr/bin/env bash
# One device call (see bench/README.md, "GPU"): the test suite on CUDA, then bench/gpu.py, each bounded.
#   TEST_S=180 BENCH_ARGS="--sections 1.5b-lora --variants trl-gc,lora_ns" bash bench/gpu_call.sh
#   TESTS="tests/test_merge.py tests/test_infer.py" TEST_S=60 bash bench/gpu_call.sh   # some tests, no bench
# Environment: TESTS (default tests; empty: none), TEST_S (seconds for pytest), TEST_WORKERS (xdist, if there),
# BENCH_ARGS (bench/gpu.py's; unset: no bench), TOTAL_S (the whole call), OUT (results), PYTHON.
# Wheels in .whl/ go to a folder named site-packages: dill (datasets' fingerprints) pickles a module found
# anywhere else by value, and pyarrow's module then fails to pickle (PicklingError: MonthDayNano).
set -uo pipefail
START=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${TMPDIR:-/tmp}/lora_ns_wheels/site-packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" || echo "wheel install failed" >&2
fi
echo "wheels installed at $((SECONDS - START)) s"
"$PY" -c "import torch, transformers, trl, peft, datasets, bitsandbytes
print(torch.__version__, torch.cuda.is_available(), transformers.__version__, trl.__version__, peft.__version__,
      datasets.__version__, bitsandbytes.__version__)" 2>&1 | tail -2 | tee "$OUT/versions.txt"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1 LORA_NS_CACHE="${TMPDIR:-/tmp}/lora_ns_cache"
if [[ -n "${TESTS-tests}" ]]; then
  FLAGS=()
  "$PY" -c "import xdist" 2>/dev/null && FLAGS+=(-n "${TEST_WORKERS:-8}")
  "$PY" -c "import pytest_timeout" 2>/dev/null && FLAGS+=(--timeout 150)
  # -v: with xdist, -q prints only dots, and a run cut by TEST_S prints no summary
  timeout -s INT -k 15 "${TEST_S:-240}" "$PY" -m pytest -p no:cacheprovider -v -rfE "${FLAGS[@]}" \
    --durations=15 ${TESTS-tests} > "$OUT/pytest.log" 2>&1
  echo "pytest exit $? at $((SECONDS - START)) s"
  grep -E "(FAILED|ERROR)" "$OUT/pytest.log" | grep -v "^E " | sort -u | tail -60
  grep -E "^=+ .*(passed|failed)" "$OUT/pytest.log" | tail -1
fi
if [[ -n "${BENCH_ARGS:-}" ]]; then
  LEFT=$(( ${TOTAL_S:-540} - (SECONDS - START) - 15 ))
  timeout -s INT -k 10 $((LEFT + 20)) "$PY" bench/gpu.py --out "$OUT" --budget-s "$LEFT" $BENCH_ARGS \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $? at $((SECONDS - START)) s"
  tail -12 "$OUT/bench.log"
fi
