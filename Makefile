# trainpipe: `make run` trains and registers a model from nothing; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the pinned dependencies

run: install  ## the whole flow on the built-in defaults, offline
	$(BIN)/trainpipe run

test: install  ## the test suite (pytest exit 5, "no tests ran", is a failure)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/train_bench.py

clean:  ## remove outputs of runs (not the venv, not the DVC cache)
	rm -rf data models reports checkpoints
