"""Compare probe outputs with the autograd reference: the error measure of the parity tests."""
from __future__ import annotations

import numpy as np

#: Parity bound: |ours - reference| <= max(RELATIVE * |reference|, ABSOLUTE_FLOOR) for every element.
RELATIVE = 1e-4
ABSOLUTE_FLOOR = 1e-5


def parity_errors(ours: dict, reference: dict) -> dict[str, float]:
    """Per output, the largest |ours - ref| / max(|ref|, FLOOR / RELATIVE); parity holds when <= RELATIVE.

    Integer outputs (pred, contrast_class) report the fraction of mismatches.
    """
    errors = {}
    for name, expected in reference.items():
        got = np.asarray(ours[name])
        if got.shape != expected.shape:
            raise AssertionError(f"{name}: shape {got.shape} != reference {expected.shape}")
        if expected.dtype.kind in "iu":
            errors[name] = float(np.mean(got != expected))
            continue
        denominator = np.maximum(np.abs(expected), ABSOLUTE_FLOOR / RELATIVE)
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - expected) / denominator))
    return errors
