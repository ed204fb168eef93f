#!/usr/bin/env bash
# Train a recipe on every GPU of this machine: validate it against the accelerate config, then launch.
#
#   examples/train_multi_gpu.sh RECIPE.yaml [ACCELERATE_CONFIG.yaml] [key.sub=value ...]
#
#   examples/train_multi_gpu.sh recipes/my_recipe.yaml                      # DDP on all GPUs
#   examples/train_multi_gpu.sh recipes/my_recipe.yaml accelerate_configs/fsdp2_qlora.yaml training.max_steps=100
#
# Environment:
#   NUM_PROCESSES      processes to start (default: the visible GPUs; for a multi-node config, its own
#                      num_processes, which counts every machine's)
#   CPU_PROCESSES      on a machine without GPUs, run DDP on the CPU (gloo) with this many processes
#                      (for trying the set-up; tests/test_distributed.py uses it)
#   MAIN_PROCESS_PORT  rendezvous port (default: the config's, else 29500)
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
recipe=$1; shift
config=$repo/accelerate_configs/multi_gpu.yaml
if [[ $# -ge 1 && ( $1 == *.yaml || $1 == *.yml || $1 == *.json ) ]]; then config=$1; shift; fi
[[ -f $recipe ]] || { echo "train_multi_gpu.sh: error: $recipe: recipe not found" >&2; exit 2; }
[[ -f $config ]] || { echo "train_multi_gpu.sh: error: $config: accelerate config not found" >&2; exit 2; }

PYTHON=${PYTHON:-python}
launch=(-m accelerate.commands.launch --config_file "$config")
[[ -z ${MAIN_PROCESS_PORT:-} ]] || launch+=(--main_process_port "$MAIN_PROCESS_PORT")
gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) ||
    { echo "train_multi_gpu.sh: error: $PYTHON cannot import torch — activate the project's venv" \
           "(or set PYTHON)" >&2; exit 2; }
machines=$("$PYTHON" -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("num_machines") or 1)' \
           "$config")

processes=()  # the count the launch starts, for validate (GRPO's batches depend on it)
if [[ $gpus -eq 0 && -n ${CPU_PROCESSES:-} ]]; then
    # `accelerate launch --cpu --num_processes N` starts ONE process; --multi_gpu starts N, and
    # ACCELERATE_USE_CPU makes the Trainer join them in a gloo process group instead of training alone.
    export ACCELERATE_USE_CPU=true
    launch+=(--multi_gpu --num_processes "$CPU_PROCESSES" --mixed_precision no)
    processes=(--num-processes "$CPU_PROCESSES")
elif [[ $gpus -eq 0 ]]; then
    echo "train_multi_gpu.sh: error: no GPU visible — run on a GPU machine," \
         "or set CPU_PROCESSES=2 to try DDP on the CPU" >&2
    exit 2
elif [[ -n ${NUM_PROCESSES:-} ]]; then
    launch+=(--num_processes "$NUM_PROCESSES")
    processes=(--num-processes "$NUM_PROCESSES")
elif [[ $machines -eq 1 ]]; then
    launch+=(--num_processes "$gpus")
    processes=(--num-processes "$gpus")
fi

# Train's own set-up without weights (data sample, model config, recipe x accelerate config), once, before
# the ranks start: a recipe they would all refuse ends here in one line, not in the launcher's traceback.
"$PYTHON" -m lora_ns.validate "$recipe" --accelerate-config "$config" ${processes[@]+"${processes[@]}"} "$@"

exec "$PYTHON" "${launch[@]}" -m lora_ns.train "$recipe" "$@"
