"""The features detectors read from a probe result, and GradNorm's closed-form score (numpy only)."""
from __future__ import annotations

import numpy as np

from gradprobe.base.errors import InputError

#: Added before the log: a zero gradient norm stays finite.
EPS = 1e-20
#: Which output each ``Detector.layers`` setting reads, in order of preference.
SOURCES = {"all": ("layer_grad_sqnorm", "confounding_grad_sqnorm"), "last": ("confounding_grad_sqnorm",)}


def feature_source(layers: str, outputs) -> str:
    """The output a detector with ``layers`` reads from a graph with ``outputs`` (names)."""
    if layers not in SOURCES:
        raise InputError(f"layers must be one of {sorted(SOURCES)}, got {layers!r}")
    return next(name for name in SOURCES[layers] if name in outputs)


def gradient_features(result, source: str = "layer_grad_sqnorm") -> np.ndarray:
    """log ||dJ/dθ_i||² per parameter tensor θ_i, J = BCE(z, all-ones) (docs/METHODS.md §1), float64 [B, F].

    ``source``: the output holding the squared norms, or a ``layers`` setting ("all": every tensor when
    the result has ``layer_grad_sqnorm``, else the last Linear's; "last": the last Linear's weight and
    bias). Logs, because the norms span decades.
    """
    if source in SOURCES:
        source = feature_source(source, result.outputs)
    if source not in result.outputs:
        raise InputError(f"features come from {sorted(SOURCES)} or an output with gradient norms; "
                         f"{source!r} is neither (outputs: {list(result.outputs)})")
    return np.log(np.asarray(result[source], dtype=np.float64) + EPS)


def gradnorm_score(result, temperature: float = 1.0) -> np.ndarray:
    """GradNorm (Huang et al. 2021, docs/METHODS.md §5) closed form, negated: -(1/T)·||h||₁·||p − u||₁.

    The closed form of a Linear head. For SqueezeNet's conv head ``features`` is the conv's input averaged over
    positions, so there it scores a Linear reading those features, not the conv's own gradient."""
    z = np.asarray(result.logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = 1.0 / p.shape[1]
    return -np.abs(result.features).sum(axis=1) * np.abs(p - u).sum(axis=1) / temperature
