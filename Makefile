# The two commands a newcomer needs: `make demo` (run and chat locally) and `make test` (lint + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: help setup setup-demo demo test test-fast faults test-servers lint format
.DEFAULT_GOAL := help

# `make` or `make help`: the targets, each with the line after its `##`.
help:
	@echo "make <target>, where <target> is one of:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 16

# The demo needs the runtime and the demo extras only; the tests add their tool chain on top. Python 3.11 or newer
# (tomllib, and the syntax), said in one line before anything is installed.
$(BIN)/.demo-installed: requirements.txt requirements-demo.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is needed: \
	$(PYTHON) is $$($(PYTHON) -V 2>&1). Run make with PYTHON=python3.11 (or newer)."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-demo.txt
	touch $@

$(BIN)/.dev-installed: $(BIN)/.demo-installed requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# LiteLLM's proxy, a real OpenAI-compatible server the tests start, lives in a virtualenv of its own (its pins are
# not the gateway's).
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.installed: requirements-litellm.txt
	$(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/pip install -q -r requirements-litellm.txt
	touch $@

setup-demo: $(BIN)/.demo-installed  ## the virtualenv with what the demo needs

setup: $(BIN)/.dev-installed $(LITELLM_VENV)/.installed  ## the virtualenvs with the test and lint tools too

demo: setup-demo  ## run the bot on embedded defaults and chat with it in this terminal
	$(BIN)/python -m demo

# The suite starts its own Redis and MariaDB (demo/mariadb_server.py); this makes sure their programs are installed
# (with apt-get when run as root), and the tools some tests drive (Chromium, wrk, kubectl, promtool).
test-servers:  ## install the servers and tools the tests drive (apt-get, as root)
	@tests/install_test_tools.sh

# The suite runs on this many pytest-xdist workers, each with private servers of its own (0: in this process).
# A test module runs whole on one worker (loadfile): the quickstart tests, which share the demo's fixed ports, never
# run at once. docs/development.md has the timings.
PYTEST_WORKERS ?= 4
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

# Everything but the fault campaigns: lint, unit tests, end-to-end tests with gunicorn replicas, fuzzing
# (docs/development.md).
# It names its 20 slowest tests at the end (docs/development.md keeps a measured list).
test: setup lint test-servers  ## lint and the whole suite but the fault campaigns (docs/development.md)
	$(BIN)/python -m pytest $(XDIST) -m "not faults" --durations=20 $(PYTEST_ARGS)

# The fast tier: no gunicorn, no end-to-end tests (the `e2e` marker).
test-fast: setup lint test-servers  ## lint and the suite without its end-to-end tier
	$(BIN)/python -m pytest $(XDIST) -m "not e2e" $(PYTEST_ARGS)

# The fault campaigns (the `faults` marker: a few minutes each, every count zero, and the mutants each counted),
# spread test by test over FAULT_WORKERS workers: each campaign runs its own replicas, Redis and MariaDB. CI runs
# them after `make test` (.ci/run).
FAULT_WORKERS ?= 2
faults: setup test-servers  ## the fault campaigns and their mutants (FAULTS.md), about 11 minutes
	$(BIN)/python -m pytest -n $(FAULT_WORKERS) --dist load -m faults $(PYTEST_ARGS)

# ruff, and the import layers of services/ (pyproject.toml, [tool.importlinter]).
lint: setup  ## ruff, and the import layers of services/
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache

format: setup  ## ruff's fixes and formatting
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
