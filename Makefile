# FedHub: `make demo` runs a real federated run, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The shared Fashion-MNIST copy when it is beside the checkout; otherwise Keras' cache/download.
FEDHUB_DATA_DIR ?= $(abspath $(wildcard ../shared/data/fashion-mnist))
export FEDHUB_DATA_DIR

.PHONY: demo test lint clean bench help

help:
	@echo "make demo   - set up .venv, split data over 3 devices, train 3 rounds, print accuracy"
	@echo "make test   - set up .venv and run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (results in docs/benchmarks.md)"
	@echo "make clean  - remove run-time state (server_training/, eval/, devices/)"

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 needed)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The tests also run the simulation on a Ray cluster: Ray is an extra that `make demo` does not need.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,ray]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m utils.demo --devices 3 --rounds 3

test: $(VENV)/.installed-ray
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) bench/round_overhead.py

clean:
	$(PY) -m utils.cleaner --secrets
