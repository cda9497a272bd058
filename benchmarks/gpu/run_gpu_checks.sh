#!/usr/bin/env bash
# GPU checks for the fused norm kernels (issue 3). Run on a CUDA machine from the repo root:
#   bash benchmarks/gpu/run_gpu_checks.sh        (needs torch with CUDA, cuda-python, nvidia-cuda-nvrtc)
# Compiles sqnorm.cu with NVRTC, checks every kernel against the numpy oracle on ResNet-18 CIFAR shapes at
# batch 256, times the kernels against torch.func vmap(grad) and against the memory-bandwidth floor.
# Budget: under 8 minutes on an H200 (the vmap reference is the slow part).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || \
  python3 -m pip install -q --no-deps -e .
python3 -c "import cuda.bindings" 2>/dev/null || python3 -m pip install -q cuda-python
python3 -c "from gradprobe.kernels.cuda_norms import compile_ptx; compile_ptx()" 2>/dev/null || \
  python3 -m pip install -q "nvidia-cuda-nvrtc==13.0.*"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu/gpu_checks.py "$@"
