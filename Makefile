# One entry point for a fresh machine: `make demo` (main job) and `make test` (test suite).
# Both create .venv and install equislide into it first (with the dev and baselines extras).

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,baselines
# The CPU build of torch; pip would otherwise pull a multi-GB CUDA build on machines without
# one cached. Override for GPU nodes, e.g. `make install TORCH_SPEC='torch>=2.2,<2.14'`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint bench

$(BIN)/equislide: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/equislide

demo: install
	$(BIN)/equislide demo

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m 'not slow'

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/sre_conv.py --quick
