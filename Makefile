# Two entry points for a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint clean-cache

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: this machine carries its CPU build; an unpinned torch pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python -m hf_encore.apps.demo

# CI runs this: the linter, then the whole suite (its slowest tests listed at the end: the suite's time budget).
test: lint
	$(BIN)/python -m pytest -q --durations=15 tests

lint: setup
	$(BIN)/ruff check hf_encore tests benchmarks examples

# The inner loop, on tiny random models: everything but the tests marked slow (the real SmolLM2, the docs and
# examples, saves killed at every step).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests
