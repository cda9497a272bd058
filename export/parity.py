"""Compare probe outputs with a reference: the one error measure of the export check, the tests and tables."""
from __future__ import annotations

import numpy as np

#: Parity bound: |ours - reference| <= max(RELATIVE * |reference|, ABSOLUTE_FLOOR) for every element.
RELATIVE = 1e-4
ABSOLUTE_FLOOR = 1e-5


def parity_errors(ours: dict, reference: dict, *, floor: float = ABSOLUTE_FLOOR / RELATIVE,
                  per_output: bool = False) -> dict[str, float]:
    """Per output in ``reference``, the largest |ours - ref| / max(|ref|, floor); parity holds when <= RELATIVE.

    ``per_output``: divide by the output's largest |ref| instead of each element's (a scale-free check
    for outputs whose small entries carry no meaning on their own). Integer outputs report the fraction
    of mismatches.
    """
    errors = {}
    for name, expected in reference.items():
        expected = np.asarray(expected)
        got = np.asarray(ours[name])
        if got.shape != expected.shape:
            raise AssertionError(f"{name}: shape {got.shape} != reference {expected.shape}")
        if expected.dtype.kind in "iu":
            errors[name] = float(np.mean(got != expected))
            continue
        scale = np.abs(expected).max(initial=0.0) if per_output else np.abs(expected)
        denominator = np.maximum(scale, floor)
        errors[name] = float(np.max(np.abs(got.astype(np.float64) - expected) / denominator, initial=0.0))
    return errors
