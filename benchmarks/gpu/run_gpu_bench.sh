#!/usr/bin/env bash
# The GPU benchmark (issue 14), one prepared script for a lent GPU machine; from the repo root:
#   bash benchmarks/gpu/run_gpu_bench.sh            (results in $OUT, else benchmarks/results/gpu_bench.{json,md})
# Needs torch with CUDA, cuda-python and nvidia-cuda-nvrtc (all on the H200 image); uses torchvision,
# pytorch-grad-cam, onnxruntime-gpu and TensorRT where they are installed and says so where not.
# Budget: the Python part stops starting sections at 7.5 minutes; `timeout` kills it at 8.
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || \
  python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD/.gpu-src:${PYTHONPATH:-}"
if ! python3 -c "import gradprobe" 2>/dev/null; then  # no pip install possible: the package by its import names
  mkdir -p .gpu-src/gradprobe && cp -r sdk/. .gpu-src/gradprobe/ && \
  for layer in export runtime kernels; do rm -rf ".gpu-src/gradprobe/$layer"; cp -r "$layer" ".gpu-src/gradprobe/$layer"; done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader || true
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu/gpu_bench.py "$@"
