# One-command set-up: every target creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default
PYTEST_ARGS ?=

.PHONY: setup train test bench lint clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py --gin_file=gin_configs/experiments/default.gin --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_moe_layer.py --json docs/bench_moe_layer.json

lint: $(STAMP)
	$(VENV)/bin/ruff check moe layers experiments scripts tests

clean:
	rm -rf $(VENV) workdirs .pytest_cache
