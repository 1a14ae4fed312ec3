# Quick start: `make generate` (main job) and `make test` (whole suite). Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build on this machine's disk; any other pin downloads CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	touch $@

.PHONY: setup generate test
setup: $(STAMP)

generate: $(STAMP)
	$(PY) -m tests.tiny_models build/demo-llama
	$(VENV)/bin/sprintllm generate --model build/demo-llama "The quick brown fox" --max-tokens 32

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest
