"""The CUDA layer's parts that need no GPU: the device-array interface, views, foreign arrays, the missing driver."""
import numpy as np
import pytest

from gradprobe import BackendUnavailableError, InputError
from gradprobe.runtime import cuda


def test_device_array_exposes_the_cuda_array_interface_v3():
    array = cuda.DeviceArray.wrap(0x7F0000001000, (4, 3, 2), "float32", stream=0x55)
    assert array.__cuda_array_interface__ == {"shape": (4, 3, 2), "typestr": "<f4", "data": (0x7F0000001000, False),
                                              "version": 3, "strides": None, "stream": 0x55}
    assert cuda.DeviceArray.wrap(0x1000, (2,), "int64").__cuda_array_interface__["stream"] is None  # never 0
    assert array.nbytes == 96 and len(array) == 4 and array.size == 24


def test_row_slices_and_views_point_into_the_same_buffer():
    array = cuda.DeviceArray.wrap(0x1000, (10, 6), "float32")
    rows = array[2:5]
    assert rows.shape == (3, 6) and rows.pointer == 0x1000 + 2 * 6 * 4 and rows.owner is array
    assert array[8:100].shape == (2, 6) and array[5:2].shape == (0, 6)
    assert array.view((4, 3), "float64").nbytes == 96
    with pytest.raises(InputError, match="does not fit"):
        array.view((100,))
    with pytest.raises(InputError, match="contiguous row slices"):
        array[::2]


class _ForeignCudaArray:
    """What CuPy or torch expose, without either installed."""

    def __init__(self, shape, strides=None, typestr="<f4", stream=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0xABC000, False),
                                         "version": 3, "strides": strides, "stream": stream}


def test_foreign_device_arrays_are_viewed_without_a_copy():
    foreign = _ForeignCudaArray((2, 3), strides=(12, 4), stream=7)
    assert cuda.is_device_array(foreign) and not cuda.is_device_array(np.zeros(3))
    view = cuda.as_device_array(foreign)
    assert (view.pointer, view.shape, view.dtype, view.stream, view.owner) == (0xABC000, (2, 3), np.float32, 7, foreign)
    # a dimension of extent 1 may have any stride
    assert cuda.as_device_array(_ForeignCudaArray((1, 3), strides=(999, 4))).shape == (1, 3)
    with pytest.raises(InputError, match="C-contiguous"):
        cuda.as_device_array(_ForeignCudaArray((2, 3), strides=(4, 8)))  # a transposed view


def test_dlpack_capsules_are_read_without_their_framework():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    view = cuda.dlpack_view(array)
    assert (view.pointer, view.shape, view.dtype, view.device_type) == (array.ctypes.data, (3, 4), np.float32,
                                                                        cuda.DLPACK_CPU)
    assert view.strides in (None, (4, 1))
    strided = cuda.dlpack_view(array[:, ::2])
    assert strided.strides == (4, 2) and not cuda._c_contiguous(strided.shape, strided.strides)
    assert cuda.dlpack_view(np.zeros(5, np.int64)).dtype == np.int64
    with pytest.raises(InputError, match="not a CUDA device"):
        cuda.as_device_array(_HostDLPack(array))


class _HostDLPack:
    """A non-numpy producer of host memory through DLPack only."""

    def __init__(self, array):
        self.array = array

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_without_a_driver_the_gpu_path_says_what_is_missing():
    try:
        cuda.device(0)
    except BackendUnavailableError as error:
        assert "NVIDIA" in str(error) or "cuda-python" in str(error)
    else:
        pytest.skip("this machine has a CUDA driver and device")
