# Peers venv (pytorch-grad-cam, pytorch-ood, Captum on torch 2.14.1 + torchvision 0.29.1; ~6 GB) and the benchmarks.
# Included from the top Makefile:  include benchmarks/peers.mk
# `make peers` is idempotent: the stamp file is rebuilt only when it is missing or this file changes.

PEERS_VENV  ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.gradprobe-peers.stamp
PEERS_PY    ?= python3.11
BENCH_PY    ?= .venv/bin/python

.PHONY: peers bench

peers: $(PEERS_STAMP)

$(PEERS_STAMP): benchmarks/peers.mk
	test -x $(PEERS_VENV)/bin/python || $(PEERS_PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install torch==2.14.1 torchvision==0.29.1
	$(PEERS_VENV)/bin/pip install grad-cam pytorch-ood captum onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 \
		safetensors tqdm scikit-learn timm==1.0.31
	$(PEERS_VENV)/bin/pip install --no-deps -e .
	$(PEERS_VENV)/bin/python -c "import torchvision, timm, pytorch_grad_cam, pytorch_ood, captum, gradprobe"
	touch $@

bench: peers
	$(BENCH_PY) -m pytest benchmarks -p no:cacheprovider
