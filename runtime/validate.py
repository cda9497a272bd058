"""Input checks done once, before any engine runs, with messages that name the expected value."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gradprobe.errors import InputError


def validate_images(images, chw: Sequence[int]) -> np.ndarray:
    """Return ``images`` as a C-contiguous float32 [B, C, H, W] array, or raise InputError."""
    expected = f"[B, {', '.join(str(d) for d in chw)}]"
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy.ndarray of shape {expected} and dtype float32, "
                         f"got {type(images).__name__}")
    if images.ndim != 4:
        hint = " (for one image use images[None])" if images.ndim == 3 else ""
        raise InputError(f"images must have rank 4, shape {expected}; got rank {images.ndim}, "
                         f"shape {list(images.shape)}{hint}")
    if images.dtype != np.float32:
        raise InputError(f"images must have dtype float32 with values in [0, 1], got {images.dtype}; "
                         "convert with images.astype(np.float32) (and / 255 for uint8 pixels)")
    if images.shape[0] == 0:
        raise InputError(f"images is an empty batch (shape {list(images.shape)}); pass at least one image")
    if images.shape[1] != chw[0]:
        raise InputError(f"images must have {chw[0]} channel(s), shape {expected}; got {images.shape[1]} "
                         f"(shape {list(images.shape)})")
    if tuple(images.shape[2:]) != tuple(chw[1:]):
        raise InputError(f"images must be {chw[1]}x{chw[2]} pixels, shape {expected}; "
                         f"got {images.shape[2]}x{images.shape[3]}")
    finite = np.isfinite(images)
    if not finite.all():
        bad = np.argwhere(~finite.reshape(len(images), -1).all(axis=1)).ravel()
        raise InputError(f"images contain NaN or Inf in {bad.size} image(s), first at batch index {int(bad[0])}")
    return np.ascontiguousarray(images)


def validate_contrast(contrast, batch: int, class_names: Sequence[str]) -> np.ndarray:
    """Return the contrast classes as int64 [batch]; -1 means the runner-up class.

    Accepts None (runner-up for all), one class index or name for all, or one per image.
    """
    classes = len(class_names)
    if contrast is None:
        return np.full(batch, -1, dtype=np.int64)
    if isinstance(contrast, str) or (isinstance(contrast, (list, tuple)) and contrast
                                     and all(isinstance(c, str) for c in contrast)):
        names = [contrast] if isinstance(contrast, str) else list(contrast)
        unknown = [n for n in names if n not in class_names]
        if unknown:
            raise InputError(f"unknown class name(s) {unknown}; expected one of {list(class_names)}")
        indices = [list(class_names).index(n) for n in names]
        contrast = indices[0] if isinstance(contrast, str) else indices
    array = np.asarray(contrast)
    if array.dtype.kind not in "iu":
        raise InputError(f"contrast must be integer class indices (or class names), got dtype {array.dtype}")
    if array.ndim == 0:
        array = np.full(batch, int(array), dtype=np.int64)
    if array.ndim != 1 or array.shape[0] != batch:
        raise InputError(f"contrast must be one class for all images or one per image (length {batch}), "
                         f"got shape {list(array.shape)}")
    out_of_range = array[(array < -1) | (array >= classes)]
    if out_of_range.size:
        raise InputError(f"contrast class {int(out_of_range[0])} is out of range: expected -1 (runner-up) "
                         f"or 0..{classes - 1}")
    return array.astype(np.int64)
