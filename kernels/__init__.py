"""Fused per-sample gradient-norm kernels (METHODS.md §6).

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
