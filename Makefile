# Each target sets up .venv by itself, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: quickstart test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Train the quickstart model on the CPU (stdlib corpus, ~6 min on 2 cores).
quickstart: $(STAMP)
	$(PY) -m lc_jax.train --config configs/quickstart.py --workdir runs/quickstart

## Run the test suite (CPU, ~3 min on 2 cores).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/train_step.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs
