# The serving venv: PyTriton (Triton Inference Server), tritonclient, Ray Data, pyarrow, torch for the test fixtures.
# Included from the top Makefile with `-include serve.mk`.
#
# Why a venv of its own, made from the system's python3.11 (not the main venv's interpreter):
# PyTriton's Python-backend stub is linked against the system libpython3.11.so.1.0 but runs the venv's
# standard library; a venv made from another 3.11 build (pyenv's 3.11.7 over Debian's 3.11.2 library)
# kills the stub at start. And PyTriton 0.7 needs numpy<2 while the main venv pins numpy 2 (see
# requirements/serve.txt). `gradprobe serve` checks the match itself and says what to do.
SERVE_PYTHON ?= /usr/bin/python3.11
SERVE_VENV   ?= .venv-serve
SERVE_PY     := $(SERVE_VENV)/bin/python
SERVE_STAMP  := $(SERVE_VENV)/.gradprobe-serve.stamp

.PHONY: serve-setup test-serve bench-serve

serve-setup: system data $(SERVE_STAMP)

$(SERVE_STAMP): serve.mk setup.py requirements/constraints.txt requirements/serve.txt
	@test -x $(SERVE_PYTHON) && $(SERVE_PYTHON) -c "import ensurepip, venv" 2>/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y python3.11 python3.11-venv; }
	@ldconfig -p | grep -q 'libpython3.11.so.1.0' || $(SUDO) apt-get install -y libpython3.11
	rm -rf $(SERVE_VENV)
	$(SERVE_PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --upgrade pip
	grep -vE '^(numpy|protobuf|ml_dtypes)==' requirements/constraints.txt > $(SERVE_VENV)/constraints.txt
	$(SERVE_PY) -m pip install -q torch==2.13.0 -c $(SERVE_VENV)/constraints.txt -c requirements/serve.txt
	$(SERVE_PY) -m pip install -q -c $(SERVE_VENV)/constraints.txt -c requirements/serve.txt \
		-e ".[export,cpu,viz,test,serve,scale]" "tritonclient[all]"
	$(SERVE_PY) -m pip check
	$(SERVE_PY) -c "from gradprobe.serve.triton import check_stub_interpreter; check_stub_interpreter()"
	touch $@

# The real-server and Ray tests (marker `serve`), plus the no-extras checks.
test-serve: serve-setup
	$(SERVE_PY) -m pytest -m serve tests/sdk/serve -p no:cacheprovider

# Load/fault table (benchmarks/results/serve.md) and Ray 1-vs-2-actor throughput (benchmarks/results/score.md).
bench-serve: serve-setup
	$(SERVE_PY) -m benchmarks.serve_load
	$(SERVE_PY) -m benchmarks.score_throughput

# `make test` (CI's command) runs the serving suite as well; `make test SERVE_TESTS=0` leaves it out.
SERVE_TESTS ?= 1
ifneq ($(SERVE_TESTS),0)
test: test-serve
endif
