"""The CUDA kernels compile with NVRTC on any machine (cuda-python + nvidia-cuda-nvrtc, the [kernels] extra)."""
import pytest

pytest.importorskip("cuda.bindings", reason="cuda-python is not installed: pip install 'gradprobe[kernels]'")


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_compiles_to_ptx_without_a_gpu(arch):
    from gradprobe import BackendUnavailableError
    from gradprobe.kernels.cuda_norms import KERNELS, compile_ptx

    try:
        ptx = compile_ptx(arch)
    except BackendUnavailableError as error:
        pytest.skip(str(error))
    text = ptx.decode(errors="replace")
    assert f".target sm_{arch[-2:]}" in text
    for name in KERNELS:
        assert f".entry {name}(" in text, name
