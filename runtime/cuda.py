"""A small CUDA layer on cuda-python (the driver API), in the manner of Polygraphy's ``cuda`` wrapper.

What the GPU backends need and no more: the device's identity (name, compute capability), a stream,
device buffers that expose ``__cuda_array_interface__`` (so CuPy, torch and the norm kernels read them
by pointer), and views of foreign device arrays given through ``__cuda_array_interface__`` or DLPack,
so inputs already on the GPU are used where they are. Importing this module imports nothing from CUDA;
the first call does, and a machine without cuda-python or without a driver gets a
``BackendUnavailableError`` that says what is missing.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, GradprobeError, InputError

#: DLPack device types (dlpack.h): host memory and CUDA device memory.
DLPACK_CPU, DLPACK_CUDA = 1, 2
#: DLPack (type code, bits) -> numpy dtype, for the dtypes a probe graph exchanges.
_DLPACK_DTYPES = {(2, 16): "float16", (2, 32): "float32", (2, 64): "float64", (0, 32): "int32", (0, 64): "int64",
                  (1, 8): "uint8", (0, 8): "int8", (6, 8): "bool"}


def driver():
    """``cuda.bindings.driver``, or a BackendUnavailableError naming the extra that installs it."""
    try:
        from cuda.bindings import driver as cuda_driver
    except ImportError as error:
        raise BackendUnavailableError("the GPU path needs cuda-python: pip install 'gradprobe[gpu]'") from error
    return cuda_driver


def check(result, what: str):
    """The values of a cuda-python call ``(CUresult, *values)``; a GradprobeError naming the call otherwise."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = driver().cuGetErrorName(error)
        raise GradprobeError(f"{what} failed: {name[1].decode() if int(name[0]) == 0 else error!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Device:
    """One CUDA device with its primary context current (the context torch and CuPy share)."""

    ordinal: int
    name: str
    compute_capability: tuple
    total_bytes: int

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


@lru_cache(maxsize=None)
def _open(ordinal: int) -> tuple[Device, object]:
    cuda = driver()
    try:
        check(cuda.cuInit(0), "cuInit")
    except GradprobeError as error:
        raise BackendUnavailableError(f"no usable CUDA device ({error}); the GPU path needs an NVIDIA GPU") from error
    except Exception as error:  # cuda-pathfinder raises when libcuda (the driver) is not installed at all
        raise BackendUnavailableError(f"no NVIDIA driver on this machine ({type(error).__name__}: {error}); "
                                      "the GPU path needs an NVIDIA GPU and its driver") from error
    count = check(cuda.cuDeviceGetCount(), "cuDeviceGetCount")
    if not 0 <= ordinal < count:
        raise BackendUnavailableError(f"CUDA device {ordinal} does not exist; this machine has {count}")
    handle = check(cuda.cuDeviceGet(ordinal), "cuDeviceGet")
    attribute = cuda.CUdevice_attribute
    major = check(cuda.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle), "major")
    minor = check(cuda.cuDeviceGetAttribute(attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle), "minor")
    name = check(cuda.cuDeviceGetName(256, handle), "cuDeviceGetName").split(b"\0")[0].decode()
    total = check(cuda.cuDeviceTotalMem(handle), "cuDeviceTotalMem")
    context = check(cuda.cuDevicePrimaryCtxRetain(handle), "cuDevicePrimaryCtxRetain")
    return Device(ordinal, name, (int(major), int(minor)), int(total)), context


def device(ordinal: int = 0) -> Device:
    """The device ``ordinal``, its primary context made current on this thread."""
    info, context = _open(ordinal)
    check(driver().cuCtxSetCurrent(context), "cuCtxSetCurrent")
    return info


class Stream:
    """A CUDA stream of the current context; ``handle`` is the integer TensorRT and the kernels take."""

    def __init__(self):
        self._stream = check(driver().cuStreamCreate(0), "cuStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    def synchronize(self) -> None:
        check(driver().cuStreamSynchronize(self._stream), "cuStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            check(driver().cuStreamDestroy(self._stream), "cuStreamDestroy")
            self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceArray:
    """A C-contiguous array in device memory: allocated with ``cuMemAlloc`` (``empty``) or a view of
    memory someone else owns (``wrap``). Exposes ``__cuda_array_interface__`` (version 3), so CuPy,
    torch and the norm kernels read it by pointer; ``stream`` is the stream its contents are produced on,
    which consumers synchronise with."""

    def __init__(self, pointer: int, shape, dtype, *, owner=None, stream: int | None = None, allocated: bool = False):
        self.pointer, self.shape, self.dtype = int(pointer), tuple(int(d) for d in shape), np.dtype(dtype)
        self.owner, self.stream, self._allocated = owner, stream, allocated

    @classmethod
    def empty(cls, shape, dtype, *, stream: int | None = None) -> "DeviceArray":
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        pointer = check(driver().cuMemAlloc(max(nbytes, 1)), "cuMemAlloc")
        return cls(int(pointer), shape, dtype, stream=stream, allocated=True)

    @classmethod
    def wrap(cls, pointer: int, shape, dtype, *, owner=None, stream: int | None = None) -> "DeviceArray":
        """A view of device memory that ``owner`` keeps alive (no allocation, nothing freed here)."""
        return cls(pointer, shape, dtype, owner=owner, stream=stream)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def __cuda_array_interface__(self) -> dict:
        # The protocol reserves stream 0 (ambiguous); None means "no synchronisation needed".
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.pointer, False), "version": 3,
                "strides": None, "stream": self.stream or None}

    def view(self, shape, dtype=None) -> "DeviceArray":
        """The first elements of this buffer as ``shape`` (a buffer allocated once serves every smaller batch)."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > self.nbytes:
            raise InputError(f"a view of shape {list(shape)} does not fit a buffer of {self.nbytes} bytes")
        return DeviceArray(self.pointer, shape, dtype, owner=self, stream=self.stream)

    def __getitem__(self, index) -> "DeviceArray":
        """Rows ``start:stop`` of the first axis, as a view (what chunking a batch needs)."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise InputError("a DeviceArray takes only contiguous row slices a[start:stop]")
        start, stop, _ = index.indices(self.shape[0])
        stop = max(stop, start)
        row = self.nbytes // max(self.shape[0], 1)
        return DeviceArray(self.pointer + start * row, (stop - start, *self.shape[1:]), self.dtype, owner=self,
                           stream=self.stream)

    def copy_from_host(self, array: np.ndarray, stream: int = 0) -> "DeviceArray":
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes != self.nbytes:
            raise InputError(f"cannot copy {array.nbytes} bytes into a device array of {self.nbytes}")
        check(driver().cuMemcpyHtoDAsync(self.pointer, array.ctypes.data, array.nbytes, stream), "cuMemcpyHtoDAsync")
        return self

    def copy_to_host(self, out: np.ndarray | None = None, stream: int = 0) -> np.ndarray:
        """A host copy; asynchronous on ``stream``: synchronise it before reading ``out``."""
        out = np.empty(self.shape, self.dtype) if out is None else out
        check(driver().cuMemcpyDtoHAsync(out.ctypes.data, self.pointer, self.nbytes, stream), "cuMemcpyDtoHAsync")
        return out

    def numpy(self) -> np.ndarray:
        """A host copy, after the stream that produced this array (or the whole device) is done."""
        out = self.copy_to_host(stream=self.stream or 0)
        check(driver().cuStreamSynchronize(self.stream or 0), "cuStreamSynchronize")
        return out

    def free(self) -> None:
        if self._allocated and self.pointer:
            check(driver().cuMemFree(self.pointer), "cuMemFree")
        self.pointer, self._allocated = 0, False

    def __del__(self):
        if getattr(self, "_allocated", False):
            try:
                self.free()
            except Exception:  # interpreter shutdown: the driver may be gone already
                pass

    def __repr__(self) -> str:
        return f"DeviceArray(shape={list(self.shape)}, dtype={self.dtype}, pointer={self.pointer:#x})"


# ------------------------------------------------------------------------------ foreign arrays
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


@dataclass(frozen=True)
class DLPackView:
    """What a DLPack capsule describes; ``capsule`` is kept so the producer's memory stays alive."""

    pointer: int
    shape: tuple
    dtype: np.dtype
    strides: tuple | None       # in elements, as DLPack gives them; None = C-contiguous
    device_type: int
    device_id: int
    capsule: object


def dlpack_view(array, stream: int | None = None) -> DLPackView:
    """Read ``array.__dlpack__()`` (legacy, unversioned capsule) without importing its framework.

    ``stream`` is the consumer stream for CUDA producers (the producer orders its work before it)."""
    device_type, device_id = array.__dlpack_device__()
    capsule = array.__dlpack__(stream=stream) if int(device_type) == DLPACK_CUDA else array.__dlpack__()
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    tensor = _DLManagedTensor.from_address(get_pointer(capsule, b"dltensor")).dl_tensor
    key = (tensor.dtype.code, tensor.dtype.bits)
    if key not in _DLPACK_DTYPES or tensor.dtype.lanes != 1:
        raise InputError(f"DLPack dtype (code {key[0]}, {key[1]} bits, {tensor.dtype.lanes} lanes) is not supported")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    strides = None if not tensor.strides else tuple(tensor.strides[i] for i in range(tensor.ndim))
    return DLPackView((tensor.data or 0) + tensor.byte_offset, shape, np.dtype(_DLPACK_DTYPES[key]), strides,
                      int(tensor.device.device_type), int(tensor.device.device_id), capsule)


def _c_contiguous(shape: tuple, strides: tuple | None) -> bool:
    """``strides`` (in elements) describe a C-contiguous layout; dimensions of extent 1 may have any stride."""
    if strides is None:
        return True
    expected = 1
    for extent, stride in zip(reversed(shape), reversed(strides)):
        if extent != 1 and stride != expected:
            return False
        expected *= extent
    return True


def is_device_array(array) -> bool:
    """True for arrays in CUDA device memory: ``__cuda_array_interface__``, or DLPack on a CUDA device."""
    if hasattr(array, "__cuda_array_interface__"):
        return True
    device_of = getattr(array, "__dlpack_device__", None)
    if device_of is None or isinstance(array, np.ndarray):
        return False
    try:
        return int(device_of()[0]) == DLPACK_CUDA
    except Exception:
        return False


def as_device_array(array, stream: int | None = None) -> DeviceArray:
    """A zero-copy ``DeviceArray`` view of a CUDA array (CuPy, torch, JAX, ...), C-contiguous only."""
    interface = getattr(array, "__cuda_array_interface__", None)
    if interface is not None:
        dtype, shape = np.dtype(interface["typestr"]), tuple(interface["shape"])
        strides = interface.get("strides")
        if not _c_contiguous(shape, None if strides is None else tuple(s // dtype.itemsize for s in strides)):
            raise InputError("device inputs must be C-contiguous (call .contiguous() / cupy.ascontiguousarray)")
        return DeviceArray.wrap(interface["data"][0], shape, dtype, owner=array, stream=interface.get("stream"))
    view = dlpack_view(array, stream)
    if view.device_type != DLPACK_CUDA:
        raise InputError(f"array is on DLPack device type {view.device_type}, not a CUDA device")
    if not _c_contiguous(view.shape, view.strides):
        raise InputError("device inputs must be C-contiguous")
    return DeviceArray.wrap(view.pointer, view.shape, view.dtype, owner=(array, view.capsule), stream=stream)
