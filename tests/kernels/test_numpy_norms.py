"""Norm kernels: numpy direct and Gram forms equal per-sample autograd; the cost model; NVRTC compiles the CUDA."""
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from gradprobe.kernels import ConvSpec, choose_form, conv_weight_sqnorm, form_costs, linear_weight_sqnorm

CONVS = [  # in, out, kernel, stride, padding, dilation, groups, input size
    (4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 1, 9),
    (6, 6, (3, 3), (1, 1), (2, 2), (2, 2), 3, 8),
    (8, 8, (3, 3), (2, 2), (1, 1), (1, 1), 8, 10),
    (4, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1, 7),
    (3, 4, (3, 2), (2, 1), (1, 0), (1, 1), 1, 8),
]


@pytest.mark.parametrize("form", ["direct", "gram"])
@pytest.mark.parametrize("conv", CONVS)
def test_conv_norms_match_vmap(conv, form):
    cin, cout, k, s, p, d, groups, size = conv
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(cin, cout, k, s, p, d, groups, bias=False).double()
    x = torch.randn(5, cin, size, size, dtype=torch.double)

    def loss(params, sample):
        y = functional_call(layer, params, (sample[None],))
        return (y * torch.sin(y)).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))({"weight": layer.weight.detach()}, x)["weight"]
    expected = per_sample.pow(2).flatten(1).sum(1).numpy()
    y = layer(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad((y * torch.sin(y)).sum(), y)
    spec = ConvSpec(cin, cout, k, s, p, d, groups)
    ours = conv_weight_sqnorm(x.numpy(), g.numpy(), spec, form, chunk=2)
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_linear_norm():
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(4, 7)), rng.normal(size=(4, 3))
    expected = [np.square(np.outer(g[b], x[b])).sum() for b in range(4)]
    np.testing.assert_allclose(linear_weight_sqnorm(x, g), expected, rtol=1e-12)


def test_cost_model_picks_gram_for_late_wide_layers():
    early = ConvSpec(64, 64, (3, 3), (1, 1), (1, 1))
    late = ConvSpec(512, 512, (3, 3), (1, 1), (1, 1))
    assert choose_form(early, 32 * 32) == "direct"   # T^2 (out + patch) = 1M * 640 > T out patch = 37.7M
    assert choose_form(late, 4 * 4) == "gram"        # 256 * 5120 < 16 * 512 * 4608
    assert form_costs(late, 16) == {"direct": 16 * 512 * 4608, "gram": 256 * (512 + 4608)}
    assert ConvSpec(8, 8, (3, 3), groups=8).patch_size == 9


def test_unknown_form():
    with pytest.raises(ValueError, match="form must be"):
        conv_weight_sqnorm(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 4)), ConvSpec(1, 1), "fast")


def test_nvrtc_compiles_the_cuda_kernels():
    """Runs wherever cuda-python and nvidia-cuda-nvrtc are installed; no GPU needed."""
    pytest.importorskip("cuda.bindings", reason="cuda-python not installed (pip install 'gradprobe[kernels]')")
    from gradprobe import BackendUnavailableError
    from gradprobe.kernels.cuda_norms import KERNELS, compile_ptx

    try:
        ptx = compile_ptx("compute_90").decode()
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    assert ".target sm_90" in ptx
    for name in KERNELS:
        assert f".entry {name}(" in ptx


def test_blas_thread_limit_does_not_leak_between_threads():
    """Many threads computing norms at once leave the process's BLAS thread count as they found it."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")

    before = blas_threads()
    rng = np.random.default_rng(0)
    x = rng.random((32, 8, 12, 12)).astype(np.float32)
    spec = ConvSpec(8, 8, (3, 3), (1, 1), (1, 1))
    g = rng.random((32, 8, 12, 12)).astype(np.float32)
    expected = conv_weight_sqnorm(x, g, spec, "direct")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: conv_weight_sqnorm(x, g, spec, "direct", chunk=4), range(64)))
    assert all(np.array_equal(r, expected) for r in results)
    assert blas_threads() == before
