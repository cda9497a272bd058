# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# Both are idempotent: the venv, the Python packages and the Debian data package are installed once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradprobe-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system data demo test test-all clean
setup: system $(STAMP) data

# python3-venv on a bare Debian; the data set from Debian's dataset-fashion-mnist package.
system:
	@$(PYTHON) -c "import ensurepip, venv" 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y python3-venv; }

data:
	@test -f $(FASHION_MNIST) || { $(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y dataset-fashion-mnist; }; }

$(STAMP): setup.py requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[export,cpu,viz,test,kernels]"
	touch $(STAMP)

demo: setup peers
	$(VENV)/bin/gradprobe demo

test: setup
	$(PY) -m pytest -m "not slow and not gpu and not trt and not peers"

test-all: setup peers
	$(PY) -m pytest

clean:
	rm -rf $(VENV) gradprobe-demo .pytest_cache .benchmarks

-include benchmarks/peers.mk
-include serve.mk
