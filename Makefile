# Two commands: `make demo` (set up, then run the main job) and `make test` (set up, then run the tests).
# Both are idempotent: the venv, the Python packages and the Debian data package are installed once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradprobe-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

RUNTIME_VENV := .venv-runtime
TEST_BUNDLES := .cache/test-bundles
MARKERS := not slow and not gpu and not trt and not peers

.PHONY: setup system data demo test test-main test-runtime test-all clean
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
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[export,cpu,viz,test,kernels,lint]"
	touch $(STAMP)

demo: setup peers
	$(VENV)/bin/gradprobe demo

test: test-main test-runtime

test-main: setup
	$(PY) -m pytest -m "$(MARKERS)"

# The deployed path: bundles exported with torch, then the runtime tests in a venv with numpy and onnxruntime only.
test-runtime: setup
	$(PY) -m tests.bundles $(TEST_BUNDLES)
	test -x $(RUNTIME_VENV)/bin/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q -c requirements/constraints.txt numpy onnxruntime threadpoolctl tqdm filelock pytest pytest-timeout hypothesis
	$(RUNTIME_VENV)/bin/pip install -q --no-deps -e .
	$(RUNTIME_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'onnx')))" \
		|| { echo "$(RUNTIME_VENV) must hold neither torch nor onnx"; exit 1; }
	GRADPROBE_TEST_BUNDLES=$(TEST_BUNDLES) $(RUNTIME_VENV)/bin/python -m pytest -m "$(MARKERS)" \
		tests/base tests/runtime tests/sdk/test_load.py tests/sdk/test_imports.py tests/sdk/test_gradcon_load.py

test-all: setup peers
	$(PY) -m pytest

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) $(TEST_BUNDLES) gradprobe-demo .pytest_cache .benchmarks

-include benchmarks/peers.mk
-include serve.mk
