# The two commands a newcomer needs: `make demo` (run and chat locally) and `make test` (lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-demo demo test test-fast lint format

# The demo needs the runtime and the demo extras only; the tests add their tool chain on top.
$(BIN)/.demo-installed: requirements.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-demo.txt
	touch $@

$(BIN)/.dev-installed: $(BIN)/.demo-installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

setup-demo: $(BIN)/.demo-installed

setup: $(BIN)/.dev-installed

demo: setup-demo
	$(BIN)/python -m demo

# Everything: lint, unit tests, end-to-end tests with gunicorn replicas, fuzzing (README: Tests).
test: setup lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: no gunicorn, no end-to-end tests (the `e2e` marker).
test-fast: setup lint
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
