"""Per-sample squared norms of conv/linear weight gradients in numpy: the CPU path and the test oracle."""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from gradprobe.base.errors import InputError

from .cost import ConvSpec, choose_form

_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS on one thread while any caller is inside; the process's own setting back when the last leaves.

    ``threadpool_limits`` entered from several threads at once restores in the wrong order and leaves
    BLAS on one thread for good; one shared, counted limit cannot.
    """
    global _blas_users, _blas_limiter
    from threadpoolctl import threadpool_limits

    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = threadpool_limits(1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def unfold(x: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """Input patches [B, groups, patch, T] of x [B, C, H, W] (patch order matches the weight layout)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel, spec.stride, spec.padding, spec.dilation
    padded = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(padded, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]                      # [B, C, Ho, Wo, kh, kw]
    batch, channels, out_h, out_w = windows.shape[:4]
    patches = windows.transpose(0, 1, 4, 5, 2, 3)                        # [B, C, kh, kw, Ho, Wo]
    return patches.reshape(batch, spec.groups, channels // spec.groups * kh * kw, out_h * out_w)


def _grouped_grads(g: np.ndarray, groups: int) -> np.ndarray:
    batch, out_channels = g.shape[:2]
    return g.reshape(batch, groups, out_channels // groups, -1)          # [B, G, out/G, T]


def conv_weight_sqnorm(x: np.ndarray, g: np.ndarray, spec: ConvSpec, form: str = "auto",
                       chunk: int = 16, workers: int | None = None) -> np.ndarray:
    """||dL_b/dW||^2 for every sample b, from the layer input x [B,C,H,W] and output gradient g [B,O,Ho,Wo].

    Works through ``chunk`` samples at a time, so at most ``chunk`` per-sample gradients (direct) or
    Gram matrices exist per worker. Products in the inputs' dtype, sums of squares in float64.
    Chunks run on ``workers`` threads (default: the CPU count) with single-threaded BLAS: these are
    many small products, where BLAS's own thread hand-offs cost more than they give.
    """
    if form == "auto":
        form = choose_form(spec, g.shape[2] * g.shape[3])
    if form not in ("direct", "gram"):
        raise InputError(f"form must be 'direct', 'gram' or 'auto', got {form!r}")
    out = np.empty(len(x), dtype=np.float64)

    def one_chunk(start: int) -> None:
        patches = unfold(x[start:start + chunk], spec)
        grads = _grouped_grads(g[start:start + chunk], spec.groups)
        if form == "direct":
            per_sample = grads @ patches.transpose(0, 1, 3, 2)          # [b, G, out/G, patch]
            out[start:start + chunk] = np.square(per_sample, dtype=np.float64).sum(axis=(1, 2, 3))
        else:
            gram_a = patches.transpose(0, 1, 3, 2) @ patches             # [b, G, T, T]
            gram_g = grads.transpose(0, 1, 3, 2) @ grads
            out[start:start + chunk] = np.multiply(gram_a, gram_g, dtype=np.float64).sum(axis=(1, 2, 3))

    starts = range(0, len(x), chunk)
    with single_threaded_blas():
        if len(starts) == 1 or (workers or os.cpu_count() or 1) == 1:
            for start in starts:
                one_chunk(start)
        else:
            with ThreadPoolExecutor(workers or os.cpu_count()) as pool:
                list(pool.map(one_chunk, starts))
    return out


def linear_weight_sqnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """||g_b x_b^T||^2 = ||g_b||^2 ||x_b||^2 for x [B, in], g [B, out]: no per-sample gradient needed."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    return np.square(g).sum(axis=1) * np.square(x).sum(axis=1)
