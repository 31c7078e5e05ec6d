# trainpipe: `make run` trains and registers a model from nothing; `make test` runs the fast tier.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

STACK_STAMP := $(VENV)/.stack-stamp

.PHONY: install run test test-all lint bench clean stack stack-down stack-status test-stack

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@# the hooks of .pre-commit-config.yaml, in a git checkout (a tarball has none to hook into)
	@if git rev-parse --git-dir >/dev/null 2>&1; then $(BIN)/pre-commit install >/dev/null; fi
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies

run: install  ## the whole flow on the built-in defaults, offline
	$(BIN)/trainpipe run

# The tiers, by folder: tests/unit (pure functions; seconds), tests/smoke (one tiny project from
# ingest to a served answer), tests/integration (real MLflow, DVC and Prefect on small projects),
# tests/stack (make test-stack). One worker per core, each test file whole on one worker (the
# end-to-end modules share a trained project between their tests); TEST_WORKERS=0 runs everything
# in this process. pytest's exit 5, "no tests ran", is a failure.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test: install  ## the fast tier: unit tests and one end-to-end smoke (under 5 minutes on 2 cores)
	$(PYTEST) tests/unit tests/smoke

test-all: install  ## every tier but the stack: unit, smoke and integration (what CI runs)
	$(PYTEST) tests/unit tests/smoke tests/integration

$(STACK_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,stack]'
	@touch $(STACK_STAMP)

stack: $(STACK_STAMP)  ## the team stack on 127.0.0.1: PostgreSQL, S3, MLflow, Prefect, a worker (state in .stack/)
	$(BIN)/trainpipe stack up

stack-down:  ## stop every server of the stack (by pid); data and secrets stay in .stack/
	$(BIN)/python -m infra.stack down

stack-status:
	$(BIN)/python -m infra.stack status

test-stack: $(STACK_STAMP)  ## the stack tier: a stack of its own from nothing, a scheduled run, the UIs in Chromium
	@test -x /usr/bin/chromium || { test "$$(id -u)" = 0 && apt-get install -y -qq chromium >/dev/null; } \
		|| { echo "test-stack needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; }
	$(BIN)/pytest -m stack tests/stack

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/train_bench.py

clean:  ## remove outputs of runs (not the venv, not the DVC cache)
	rm -rf data models reports checkpoints
