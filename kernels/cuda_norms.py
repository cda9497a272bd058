"""The CUDA path of the norm kernels: ``cuda/sqnorm.cu`` compiled at run time with NVRTC (cuda-python).

Arrays stay on the device: inputs and outputs are any objects exposing ``__cuda_array_interface__``
(CuPy arrays, torch CUDA tensors), read by pointer, with no host copies. Compiling needs only
``cuda-python`` and ``nvidia-cuda-nvrtc`` (it works on a machine without GPU); launching needs a GPU.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from importlib import resources

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, GradprobeError, InputError

from .cost import ConvSpec, choose_form

TILE = 16
KERNELS = ("direct_sqnorm", "gram_sqnorm", "linear_sqnorm")


class _Conv(ctypes.Structure):
    """Mirror of ``struct Conv`` in sqnorm.cu, passed by value."""

    _fields_ = [(name, ctypes.c_int) for name in (
        "channels", "height", "width", "out_channels", "out_h", "out_w",
        "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "groups")]


def source() -> str:
    return (resources.files("gradprobe.kernels") / "cuda" / "sqnorm.cu").read_text()


def _cuda_bindings():
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as error:
        raise BackendUnavailableError("the CUDA kernels need cuda-python: pip install 'gradprobe[gpu]'") from error
    return driver, nvrtc


def _check(result, what: str):
    error, *values = result
    if int(error) != 0:
        raise GradprobeError(f"{what} failed: {error!r}")
    return values[0] if len(values) == 1 else values


@lru_cache(maxsize=None)
def compile_ptx(arch: str = "compute_90") -> bytes:
    """PTX for the given virtual architecture (NVRTC; no GPU needed). Raises with NVRTC's log on error."""
    _, nvrtc = _cuda_bindings()
    try:
        program = _check(nvrtc.nvrtcCreateProgram(source().encode(), b"sqnorm.cu", 0, [], []), "nvrtcCreateProgram")
    except RuntimeError as error:  # cuda-pathfinder cannot find libnvrtc
        raise BackendUnavailableError(f"NVRTC is not installed ({error}): pip install 'nvidia-cuda-nvrtc'") from error
    options = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
    error, = nvrtc.nvrtcCompileProgram(program, len(options), options)
    if int(error) != 0:
        size = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(program, log)
        raise GradprobeError(f"NVRTC could not compile sqnorm.cu:\n{log.decode(errors='replace')}")
    size = _check(nvrtc.nvrtcGetPTXSize(program), "nvrtcGetPTXSize")
    ptx = b" " * size
    _check((nvrtc.nvrtcGetPTX(program, ptx)[0], None), "nvrtcGetPTX")
    return ptx


def _pointer(array, dtype: str, name: str) -> int:
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is None:
        raise InputError(f"{name} must be a CUDA array (CuPy array or torch CUDA tensor), got {type(array).__name__}")
    if np.dtype(interface["typestr"]) != np.dtype(dtype):
        raise InputError(f"{name} must have dtype {dtype}, got {np.dtype(interface['typestr'])}")
    strides, shape = interface.get("strides"), interface["shape"]
    contiguous = tuple(int(np.prod(shape[i + 1:])) * np.dtype(dtype).itemsize for i in range(len(shape)))
    if strides is not None and tuple(strides) != contiguous:
        raise InputError(f"{name} must be C-contiguous")
    return int(interface["data"][0])


class CudaNormKernels:
    """Loads the compiled kernels into the current device's primary context (the one torch and CuPy use)."""

    def __init__(self, device: int = 0):
        driver, _ = _cuda_bindings()
        self.driver = driver
        _check((driver.cuInit(0)[0], None), "cuInit")
        handle = _check(driver.cuDeviceGet(device), "cuDeviceGet")
        major = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle), "attribute")
        minor = _check(driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle), "attribute")
        context = _check(driver.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
        _check((driver.cuCtxSetCurrent(context)[0], None), "cuCtxSetCurrent")
        ptx = np.char.array(compile_ptx(f"compute_{major}{minor}"))
        module = _check(driver.cuModuleLoadData(ptx.ctypes.data), "cuModuleLoadData")
        self.functions = {name: _check(driver.cuModuleGetFunction(module, name.encode()), name) for name in KERNELS}

    def _launch(self, name: str, grid: tuple, args: list, stream: int = 0) -> None:
        pointers = np.array([ctypes.addressof(a) for a in args], dtype=np.uint64)
        _check((self.driver.cuLaunchKernel(self.functions[name], *grid, TILE, TILE, 1, 0, stream,
                                           pointers.ctypes.data, 0)[0], None), name)

    def conv_weight_sqnorm(self, x, g, spec: ConvSpec, out, form: str = "auto", stream: int = 0) -> None:
        """out[b] = ||dL_b/dW||^2 from x [B,C,H,W] and g [B,O,Ho,Wo] (float32), out [B] float64 zeroed."""
        batch, channels, height, width = x.__cuda_array_interface__["shape"]
        _, out_channels, out_h, out_w = g.__cuda_array_interface__["shape"]
        conv = _Conv(channels, height, width, out_channels, out_h, out_w, *spec.kernel, *spec.stride,
                     *spec.padding, *spec.dilation, spec.groups)
        if form == "auto":
            form = choose_form(spec, out_h * out_w)
        tiles = lambda n: (n + TILE - 1) // TILE  # noqa: E731
        if form == "direct":
            blocks = tiles(out_channels // spec.groups) * tiles(spec.patch_size)
        else:
            blocks = tiles(out_h * out_w) ** 2
        args = [ctypes.c_void_p(_pointer(x, "float32", "x")), ctypes.c_void_p(_pointer(g, "float32", "g")), conv,
                ctypes.c_void_p(_pointer(out, "float64", "out"))]
        self._launch(f"{form}_sqnorm", (blocks, spec.groups, batch), args, stream)

    def linear_weight_sqnorm(self, x, g, out, stream: int = 0) -> None:
        """out[b] = ||g_b||^2 ||x_b||^2 for x [B, in], g [B, out] float32; out [B] float64."""
        batch, inputs = x.__cuda_array_interface__["shape"]
        outputs = g.__cuda_array_interface__["shape"][1]
        args = [ctypes.c_void_p(_pointer(x, "float32", "x")), ctypes.c_void_p(_pointer(g, "float32", "g")),
                ctypes.c_int(inputs), ctypes.c_int(outputs), ctypes.c_void_p(_pointer(out, "float64", "out"))]
        self._launch("linear_sqnorm", (batch, 1, 1), args, stream)
