# FedHub: `make demo` runs a real federated run, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# The shared Fashion-MNIST copy when it is beside the checkout; otherwise Keras' cache/download.
FEDHUB_DATA_DIR ?= $(abspath $(wildcard ../shared/data/fashion-mnist))
export FEDHUB_DATA_DIR

.PHONY: venv demo test test-fast lint clean bench help docker docker-demo

help:
	@echo "make venv   - set up .venv (then: . .venv/bin/activate)"
	@echo "make demo   - set up .venv, split data over 3 devices, train 3 rounds, print accuracy"
	@echo "make test   - set up .venv and run the whole test suite (what CI runs; prints the slowest tests)"
	@echo "make test-fast - unit and in-process tests only (no processes, no TensorFlow): a few minutes"
	@echo "make lint   - ruff"
	@echo "make bench  - benchmarks (results in docs/benchmarks.md)"
	@echo "make clean  - remove run-time state (server_training/, eval/, devices/)"
	@echo "make docker - build the images fedhub-server, fedhub-device, fedhub-dashboard"
	@echo "make docker-demo - the compose federation: 3 devices, 3 rounds, each round's accuracy"
	@echo "  (FEDHUB_FRAMEWORK=torch FEDHUB_DATA_DIR=../shared/data/cifar-10 make docker-demo: PyTorch on CIFAR-10)"

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python 3.11 needed)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,keras,torch]"
	touch $@

venv: $(VENV)/.installed

# The tests also run the simulation on a Ray cluster and log runs to MLflow: extras that `make demo`
# does not need.
$(VENV)/.installed-ray: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev,ray,bench,mlflow]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fedhub.demo --devices 3 --rounds 3

# Whole modules on two xdist workers, the slowest first (tests/conftest.py); TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-ray
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The fast tier: tests not marked slow (or docker). tests/conftest.py fails any of them that starts
# a process or imports TensorFlow, so the tier stays fast.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow and not docker"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

bench: $(VENV)/.installed
	$(PY) bench/round_overhead.py

clean:
	$(PY) -m fedhub.cleaner --secrets

# Containers (README "Containers"): Docker with compose v2 or Debian's docker-compose.
DOCKER_DEMO_ARGS ?=

docker:
	docker/build.sh $(PYTHON)

docker-demo: docker
	python3 -m fedhub.docker_demo --framework $(or $(FEDHUB_FRAMEWORK),keras) $(DOCKER_DEMO_ARGS)
