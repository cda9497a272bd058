"""Fuzzing the input validators: every case is an InputError or a documented accept, never another
exception. Seeded (derandomized Hypothesis); FAST cases by default, SLOW (>= 500) in the slow run."""
import collections

import numpy as np
import pytest
from hypothesis import given

from gradprobe import InputError
from gradprobe.runtime import contrast_matrix, validate_contrast, validate_images
from gradprobe.runtime.validate import RANGE_TOLERANCE
from tests.strategies import CLASS_NAMES, FAST, SLOW, contrasts, images, settings_for

pytestmark = pytest.mark.timeout(600)
SIZES = [pytest.param(FAST, id="fast"), pytest.param(SLOW, id="slow", marks=pytest.mark.slow)]


def _report(name: str, tally: collections.Counter, examples: int) -> None:
    print(f"\nfuzz {name}: {sum(tally.values())} cases: {dict(tally)}")
    assert sum(tally.values()) >= examples


@pytest.mark.parametrize("examples", SIZES)
def test_validate_images(examples):
    """Accepted: a C-contiguous float32 [B, 1, 28, 28], B >= 1, finite, inside [0, 1] with the slack; and it
    is what the caller passed (no mask or subclass dropped along the way)."""
    tally = collections.Counter()

    @settings_for(examples)
    @given(images())
    def check(value):
        try:
            checked = validate_images(value, (1, 28, 28), (0.0, 1.0))
        except InputError:
            tally["InputError"] += 1
            return
        tally["accepted"] += 1
        assert type(checked) is np.ndarray and checked.dtype == np.float32 and checked.flags.c_contiguous
        assert checked.ndim == 4 and checked.shape[1:] == (1, 28, 28) and len(checked) >= 1
        assert np.isfinite(checked).all()
        assert checked.min() >= -RANGE_TOLERANCE and checked.max() <= 1 + RANGE_TOLERANCE
        np.testing.assert_array_equal(checked, np.asarray(value))

    check()
    _report("validate_images", tally, examples)


@pytest.mark.parametrize("examples", SIZES)
def test_contrast_validators(examples):
    """Accepted: int64 classes in -1..C-1, [B] or [B, K]; run (validate_contrast) and explain
    (contrast_matrix) agree on every value either accepts."""
    tally = collections.Counter()

    @settings_for(examples)
    @given(contrasts(batch=2))
    def check(value):
        try:
            matrix, several = contrast_matrix(value, 2, CLASS_NAMES)
        except InputError:
            tally["InputError"] += 1
            with pytest.raises(InputError):
                validate_contrast(value, 2, CLASS_NAMES)
            return
        tally["accepted (several)" if several else "accepted"] += 1
        assert matrix.dtype == np.int64 and matrix.ndim == 2 and len(matrix) == 2 and matrix.shape[1] >= 1
        assert ((matrix >= -1) & (matrix < len(CLASS_NAMES))).all()
        if several:
            with pytest.raises(InputError, match="Probe.explain"):
                validate_contrast(value, 2, CLASS_NAMES)
        else:
            np.testing.assert_array_equal(validate_contrast(value, 2, CLASS_NAMES), matrix[:, 0])

    check()
    _report("contrast_matrix/validate_contrast", tally, examples)
