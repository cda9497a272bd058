"""Staged sums in the exported graph: ONNX Runtime's float32 ReduceSum adds a reduced axis in one accumulator."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gradprobe.export.pipeline import onnx_bytes
from gradprobe.export.reductions import SPAN, squared_sum, staged_sum


@pytest.mark.parametrize("shape", [(3, 1), (3, SPAN), (3, SPAN + 1), (2, 5, 7, 3 * SPAN + 11), (4, 2048, 1024)])
def test_staged_sum_is_the_sum(shape):
    values = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(staged_sum(values, start_dim=1), values.flatten(1).sum(dim=1), rtol=1e-12, atol=1e-12)
    assert torch.allclose(squared_sum(values), (values * values).sum(), rtol=1e-12)


class _SquaredSums(nn.Module):
    def forward(self, x):
        return (x * x).flatten(1).sum(dim=1), squared_sum(x, start_dim=1)


def test_onnx_runtime_staged_squared_sum_is_float32_exact():
    """A [2048, 1024] per-sample gradient, as timm's NF-ResNet stage-4 downsample convolution has: one
    ReduceSum is off by float32 accumulation over 2M terms; the staged graph is within 1e-6 of float64."""
    images = (torch.randn(3, 2048, 1030, generator=torch.Generator().manual_seed(1)) * 1e-3 + 1e-3)
    data, _, _ = onnx_bytes(_SquaredSums(), (images,), "squared sums")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    one_reduction, staged = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    exact = (images.double() ** 2).flatten(1).sum(dim=1).numpy()
    staged_error = np.max(np.abs(staged - exact) / exact)
    one_error = np.max(np.abs(one_reduction - exact) / exact)
    assert staged_error < 1e-6, (staged_error, one_error)
