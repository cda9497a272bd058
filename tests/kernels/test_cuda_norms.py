"""The CUDA norm kernels against the numpy oracle, on device tensors (needs an NVIDIA GPU)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("conv", [(8, 16, 3, 2, 1, 1, 1, 15), (8, 8, 3, 1, 2, 2, 8, 12), (4, 6, 1, 1, 0, 1, 2, 9)])
def test_cuda_matches_numpy(conv, form):
    from gradprobe.kernels import ConvSpec, conv_weight_sqnorm
    from gradprobe.kernels.cuda_norms import CudaNormKernels

    cin, cout, k, s, p, d, groups, size = conv
    spec = ConvSpec(cin, cout, (k, k), (s, s), (p, p), (d, d), groups)
    out_h, out_w = spec.output_size(size, size)
    x = torch.randn(5, cin, size, size, device="cuda")
    g = torch.randn(5, cout, out_h, out_w, device="cuda")
    out = torch.zeros(5, dtype=torch.float64, device="cuda")
    CudaNormKernels().conv_weight_sqnorm(x, g, spec, out, form)
    torch.cuda.synchronize()
    expected = conv_weight_sqnorm(x.cpu().numpy(), g.cpu().numpy(), spec, "direct")
    np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-5)


def test_cuda_linear():
    from gradprobe.kernels import linear_weight_sqnorm
    from gradprobe.kernels.cuda_norms import CudaNormKernels

    x, g = torch.randn(7, 300, device="cuda"), torch.randn(7, 10, device="cuda")
    out = torch.zeros(7, dtype=torch.float64, device="cuda")
    CudaNormKernels().linear_weight_sqnorm(x, g, out)
    torch.cuda.synchronize()
    np.testing.assert_allclose(out.cpu().numpy(), linear_weight_sqnorm(x.cpu().numpy(), g.cpu().numpy()), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_tap_column_fills_one_column_on_the_device(dtype):
    """What the runtime engine calls for device outputs: the other columns untouched, no host copy needed."""
    from gradprobe import kernels
    from gradprobe.kernels import ConvSpec, conv_weight_sqnorm

    spec = ConvSpec(8, 16, (3, 3), (2, 2), (1, 1), (1, 1), 1)
    x = torch.randn(300, 8, 14, 14, device="cuda")
    g = torch.randn(300, 16, 7, 7, device="cuda")
    norms = torch.full((300, 5), -1.0, dtype=dtype, device="cuda")
    kernels.write_tap_column(norms, 3, x, g, spec)
    torch.cuda.synchronize()
    expected = conv_weight_sqnorm(x.cpu().numpy(), g.cpu().numpy(), spec, "direct")
    np.testing.assert_allclose(norms[:, 3].cpu().numpy(), expected, rtol=1e-5)
    assert bool((norms[:, [0, 1, 2, 4]] == -1).all())
