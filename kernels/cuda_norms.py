"""The CUDA path of the norm kernels: ``cuda/sqnorm.cu`` compiled at run time with NVRTC (cuda-python).

Arrays stay on the device: inputs and outputs are any objects exposing ``__cuda_array_interface__``
(CuPy arrays, torch CUDA tensors, gradprobe's ``DeviceArray``), read by pointer, with no host copies.
Compiling needs only ``cuda-python`` and ``nvidia-cuda-nvrtc`` (it works on a machine without GPU);
launching needs a GPU. ``write_tap_column`` is what ``gradprobe.kernels.write_tap_column`` calls for
device arrays: the runtime engine completes a graph's tap columns with it, on the stream that
produced the taps, so the norms never leave the device.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from importlib import resources

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, GradprobeError, InputError

from .cost import ConvSpec, choose_form

TILE = 16
KERNELS = ("direct_sqnorm", "gram_sqnorm", "linear_sqnorm", "write_column_f32", "write_column_f64")


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

    def scratch(self, count: int) -> int:
        """A float64 device buffer of at least ``count`` values, allocated once and grown when needed."""
        if count > getattr(self, "_scratch_count", 0):
            if getattr(self, "_scratch", None):
                _check((self.driver.cuMemFree(self._scratch)[0], None), "cuMemFree")
            self._scratch = int(_check(self.driver.cuMemAlloc(max(count, 256) * 8), "cuMemAlloc"))
            self._scratch_count = max(count, 256)
        return self._scratch

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


def _stream_of(array) -> int:
    """The stream a ``__cuda_array_interface__`` producer asks consumers to order after (0: legacy default)."""
    stream = array.__cuda_array_interface__.get("stream")
    return int(stream) if stream and int(stream) > 2 else 0


@lru_cache(maxsize=None)
def kernels_for(device: int = 0) -> CudaNormKernels:
    """The compiled kernels for ``device``, loaded once per process."""
    return CudaNormKernels(device)


def write_tap_column(norms, column: int, x, grad, spec: ConvSpec, device: int = 0) -> None:
    """norms[:, column] = per-sample ||dL/dW||^2 of conv ``spec`` from its input ``x`` [B, C, H, W] and output
    gradient ``grad`` [B, O, Ho, Wo] (float32), all on the device; ``norms`` [B, L] float32 or float64.

    Runs on the stream that produced ``x`` (its ``__cuda_array_interface__`` stream): the sums go to a
    float64 scratch buffer, then into the column; nothing is copied to the host or synchronised here.
    """
    shape = tuple(norms.__cuda_array_interface__["shape"])
    batch = x.__cuda_array_interface__["shape"][0]
    if len(shape) != 2 or shape[0] != batch or not 0 <= column < shape[1]:
        raise InputError(f"norms must be [B={batch}, L] with column {column} < L, got shape {list(shape)}")
    kind = np.dtype(norms.__cuda_array_interface__["typestr"])
    if kind not in (np.dtype("float32"), np.dtype("float64")):
        raise InputError(f"norms must be float32 or float64, got {kind}")
    kernels, stream = kernels_for(device), _stream_of(x)
    scratch = kernels.scratch(batch)
    driver = kernels.driver
    _check((driver.cuMemsetD8Async(scratch, 0, batch * 8, stream)[0], None), "cuMemsetD8Async")
    kernels.conv_weight_sqnorm(x, grad, spec, _Pointer(scratch, (batch,), "float64"), "auto", stream)
    args = [ctypes.c_void_p(scratch), ctypes.c_void_p(_pointer(norms, kind.name, "norms")), ctypes.c_int(batch),
            ctypes.c_int(shape[1]), ctypes.c_int(column)]
    name = "write_column_f32" if kind == np.dtype("float32") else "write_column_f64"
    kernels._launch(name, ((batch + TILE * TILE - 1) // (TILE * TILE), 1, 1), args, stream)


class _Pointer:
    """A bare device pointer with the interface the launchers read."""

    def __init__(self, pointer: int, shape: tuple, dtype: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": np.dtype(dtype).str, "data": (pointer, False),
                                         "version": 3, "strides": None}
