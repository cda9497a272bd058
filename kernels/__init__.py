"""Fused per-sample gradient-norm kernels (docs/METHODS.md §6).

For a conv or linear weight, a sample's gradient is ``G = sum_t g_t a_t^T`` (a_t: input patch at
position t, g_t: output gradient there). Its squared norm is computed either directly (form G block
by block and sum squares; cost ~ T*out*in) or with the Gram identity
``||G||^2 = sum_{t,s} (g_t.g_s)(a_t.a_s)`` (cost ~ T^2*(in+out)); ``cost.choose_form`` picks per layer.

- ``cost``: the cost model (pure Python), used at export time to split layers between the ONNX graph
  (Gram form: no per-sample gradient is ever formed) and the kernels (direct form, from taps).
- ``numpy_norms``: the CPU path and the test oracle (chunks of samples: never B gradients at once).
- ``cuda_norms``: the same computations as CUDA C++ (``cuda/*.cu``) compiled at run time with NVRTC
  through cuda-python, on device pointers (``__cuda_array_interface__``), with no host copies.
"""
from .cost import ConvSpec, choose_form, form_costs  # noqa: F401
from .numpy_norms import conv_weight_sqnorm, linear_weight_sqnorm, unfold  # noqa: F401


def on_device(array) -> bool:
    """True for arrays that live on a CUDA device (CuPy, torch CUDA, gradprobe's DeviceArray)."""
    return hasattr(array, "__cuda_array_interface__")


def write_tap_column(norms, column: int, x, grad, spec: ConvSpec) -> None:
    """norms[:, column] = per-sample ||dL/dW||^2 of the conv ``spec`` from its input x and output gradient;
    on the device where the arrays live (CUDA kernels), or with numpy on the host."""
    if on_device(x):
        from .cuda_norms import write_tap_column as on_gpu

        on_gpu(norms, column, x, grad, spec)
    else:
        norms[:, column] = conv_weight_sqnorm(x, grad, spec, form="direct")
