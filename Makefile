# Each target sets up .venv by itself, so a fresh clone needs nothing else. CI also runs
# `make test PYTHON=<python3.12> VENV=.venv312` (.ci/run).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Train the quickstart model on the CPU (stdlib corpus, ~6 min on 2 cores). JAX_PLATFORMS=cpu: libtpu
## (installed for deviceless TPU compiles) would otherwise look for a TPU first.
quickstart: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m lc_jax.train --config configs/quickstart.py --workdir runs/quickstart

## Run the test suite (CPU; includes deviceless TPU compiles). .ci/run legs took 11:52-13:17 on 2
## Intel Xeon cores (9fbecce, 26230ff) and 15:30-16:30 on 2 AMD EPYC cores (eaeeb8d: 14:16 and 15:12 of
## tests; 19:14 of tests in an earlier run on the same machine; 23:34 and 26:41 for the 3.11 leg at 111931f
## and 678b643, in an hour when the TPU compiles, which no change touched, ran 1.6x slower than in the morning).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=25 tests

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/train_step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .venv312 runs

# ----------------------------------------------------------------------------- the GPU check (benchmarks/GPU_CHECK.md)
.PHONY: gpu-wheels gpu-check gpu-check-dry-run

## Download benchmarks/gpu_wheels.txt into .whl/ (Python 3.12, x86-64): what a lent GPU machine lacks.
gpu-wheels:
	sed -e 's/#.*//' -e '/^[[:space:]]*$$/d' benchmarks/gpu_wheels.txt | xargs $(PYTHON) -m pip download -q \
	  --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl

## Run the GPU check (on the GPU machine; ARGS=--dry-run or --smoke here).
gpu-check:
	bash benchmarks/gpu_check.sh $(ARGS)

## List the GPU check's steps, commands and time boxes, and check that .whl/ holds every wheel.
gpu-check-dry-run:
	bash benchmarks/gpu_check.sh --dry-run
