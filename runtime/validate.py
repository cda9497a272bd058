"""Input checks done once, before any engine runs, with messages that name the expected value.

One validator for images and one for classes serve ``Probe.run``, ``Probe.explain`` and every adapter.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gradprobe.base.errors import InputError

#: Images may overshoot their declared range by this fraction of it (resampling ringing), no more.
RANGE_TOLERANCE = 1e-3
RUNNER_UP = -1


def validate_images(images, chw: Sequence[int], value_range: Sequence[float] = (0.0, 1.0)) -> np.ndarray:
    """Return ``images`` as a C-contiguous float32 [B, C, H, W] array, or raise InputError.

    Values must be finite and inside ``value_range`` (the bundle's declared input range): an image far
    outside it is not a picture the model was trained on, and overflowing values would give NaN outputs.
    """
    images = validate_image_layout(images, chw, value_range)
    flat = images.reshape(len(images), -1)
    finite = np.isfinite(flat).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise InputError(f"images contain NaN or Inf in {bad.size} image(s), first at batch index {int(bad[0])}")
    low, high = value_range
    slack = RANGE_TOLERANCE * (high - low)
    outside = (flat.min(axis=1) < low - slack) | (flat.max(axis=1) > high + slack)
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise InputError(f"images must hold values in [{low}, {high}] (the bundle's input range); {int(outside.sum())} "
                         f"image(s) do not, first at batch index {first} with values in "
                         f"[{float(flat[first].min()):.4g}, {float(flat[first].max()):.4g}]")
    return np.ascontiguousarray(images)


def validate_image_layout(images, chw: Sequence[int], value_range: Sequence[float] | None = (0.0, 1.0)) -> np.ndarray:
    """The checks that need no pass over the values: type, rank, dtype, a non-empty batch, channels and size
    (what a typed serving endpoint also checks, before the values reach gradprobe). ``value_range`` only
    completes the messages (None where it is not known, as in a serving client)."""
    expected = f"[B, {', '.join(str(d) for d in chw)}]"
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy.ndarray of shape {expected} and dtype float32, "
                         f"got {type(images).__name__}")
    if isinstance(images, np.ma.MaskedArray):
        raise InputError("images is a masked array: the graph would read the masked values as they are; pass "
                         "images.filled(value) with the fill you mean")
    images = np.asarray(images)  # a subclass is checked, and run, as the plain array it holds
    if images.ndim != 4:
        hint = " (for one image use images[None])" if images.ndim == 3 else ""
        raise InputError(f"images must have rank 4, shape {expected}; got rank {images.ndim}, "
                         f"shape {list(images.shape)}{hint}")
    if images.dtype != np.float32:
        values = f" with values in [{value_range[0]}, {value_range[1]}]" if value_range is not None else ""
        raise InputError(f"images must have dtype float32{values}, "
                         f"got {images.dtype}; convert with images.astype(np.float32) (and / 255 for uint8 pixels)")
    if images.shape[0] == 0:
        raise InputError(f"images is an empty batch (shape {list(images.shape)}); pass at least one image")
    if images.shape[1] != chw[0]:
        raise InputError(f"images must have {chw[0]} channel(s), shape {expected}; got {images.shape[1]} "
                         f"(shape {list(images.shape)})")
    if tuple(images.shape[2:]) != tuple(chw[1:]):
        raise InputError(f"images must be {chw[1]}x{chw[2]} pixels, shape {expected}; "
                         f"got {images.shape[2]}x{images.shape[3]}")
    return images


def class_index(value, class_names: Sequence[str], what: str = "class") -> int:
    """One class as an index: a name, or an integer of any type in -1 (runner-up) .. C-1."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array is the scalar it holds
    if isinstance(value, str):
        if value not in class_names:
            raise InputError(f"unknown {what} name {value!r}; expected one of {list(class_names)}")
        return list(class_names).index(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what} must be a class index or name, got {value!r:.60} ({type(value).__name__})")
    index = int(value)  # Python ints: no overflow whatever the input's width
    if not RUNNER_UP <= index < len(class_names):
        raise InputError(f"{what} {index} is out of range: expected -1 (runner-up) or 0..{len(class_names) - 1}")
    return index


def _items(value) -> list:
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuU" and value.dtype != object:
            raise InputError(f"contrast must hold class indices or names, got an array of dtype {value.dtype}")
        return value.tolist()
    return list(value)


def contrast_matrix(contrast, batch: int, class_names: Sequence[str]) -> tuple[np.ndarray, bool]:
    """``contrast`` as int64 [B, K] (-1 = runner-up) and whether several classes per image were asked.

    None, one class for all, or one per image ([B]) give K = 1; one list per image ([B, K]) gives several.
    Names and indices may be mixed.
    """
    if contrast is None:
        return np.full((batch, 1), RUNNER_UP, dtype=np.int64), False
    if isinstance(contrast, (str, int, float, np.generic)) or (
            isinstance(contrast, np.ndarray) and contrast.ndim == 0):
        value = contrast.item() if isinstance(contrast, np.ndarray) else contrast
        return np.full((batch, 1), class_index(value, class_names, "contrast class"), dtype=np.int64), False
    if not isinstance(contrast, (list, tuple, np.ndarray)):
        raise InputError(f"contrast must be None, a class (index or name), one per image, or one list per image; "
                         f"got {type(contrast).__name__}")
    rows = _items(contrast)
    several = bool(rows) and all(isinstance(row, (list, tuple)) or (isinstance(row, np.ndarray) and row.ndim > 0)
                                 for row in rows)
    if several:
        rows = [_items(row) for row in rows]
        if len(rows) != batch or len({len(row) for row in rows}) != 1 or not rows[0]:
            raise InputError(f"several contrast classes per image must be {batch} rows of the same length K >= 1 "
                             f"(one row per image), got row lengths {[len(r) for r in rows]}")
    else:
        if len(rows) != batch:
            hint = (f"; for several contrast classes per image pass one list per image, e.g. [{rows!r:.60}]"
                    if batch == 1 else "")
            raise InputError(f"contrast must be one class for all images or one per image (length {batch}), "
                             f"got {len(rows)} classes{hint}")
        rows = [[value] for value in rows]
    matrix = np.array([[class_index(v, class_names, "contrast class") for v in row] for row in rows], dtype=np.int64)
    return matrix, several


def validate_contrast(contrast, batch: int, class_names: Sequence[str]) -> np.ndarray:
    """The contrast classes as int64 [batch]; -1 means the runner-up class."""
    matrix, several = contrast_matrix(contrast, batch, class_names)
    if several:
        raise InputError("several contrast classes per image are answered by Probe.explain; Probe.run takes "
                         "one class per image")
    return matrix[:, 0]
