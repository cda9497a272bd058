"""Label-preserving shifts of real Fashion-MNIST images: rotation, scale, translation, inverted contrast.

Where the corruptions (``corrupt``) degrade an image, these move it away from the training distribution
while a person still names the same class: the garment turned, smaller, off-centre, or drawn dark on
light. Deterministic in ``seed`` (a per-image random sign or direction), cached like the corruptions.
"""
from __future__ import annotations

import numpy as np

from gradprobe.base.errors import InputError

from .ood import SIZE, _cached, fmnist_part

#: kind -> the parameter of each level: degrees (random sign), scale factor (about the centre), pixels
#: (random direction); inversion has one level.
SHIFTS = {"rotation": (10.0, 20.0, 30.0), "scale": (0.85, 0.7, 0.55), "translation": (2.0, 4.0, 6.0),
          "invert": (1.0,)}


def _affine(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)


def shift_images(images: np.ndarray, kind: str, level: int, seed: int = 0) -> np.ndarray:
    """``images`` [N,1,28,28] in [0,1] under shift ``kind`` at ``level`` (1-based), deterministic in ``seed``.

    Rotation and translation fill with black, the background of Fashion-MNIST, so nothing but the
    garment's pose changes; inversion is ``1 - x``.
    """
    if kind not in SHIFTS:
        raise InputError(f"unknown shift {kind!r}; expected one of {list(SHIFTS)}")
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= len(SHIFTS[kind]):
        raise InputError(f"level of {kind!r} must be one of {list(range(1, len(SHIFTS[kind]) + 1))}, got {level!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (1, SIZE, SIZE):
        raise InputError(f"images must have shape [N, 1, {SIZE}, {SIZE}], got {list(images.shape)}")
    x = images[:, 0].astype(np.float64)
    amount = SHIFTS[kind][level - 1]
    if kind == "invert":
        return (1.0 - x)[:, None].astype(np.float32)
    rng = np.random.default_rng([seed, list(SHIFTS).index(kind), level])
    centre = np.full(2, (SIZE - 1) / 2)
    out = np.empty_like(x)
    for index, image in enumerate(x):
        if kind == "rotation":  # output pixel o reads input R^-1 (o - c) + c
            angle = np.deg2rad(amount * rng.choice((-1.0, 1.0)))
            matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            out[index] = _affine(image, matrix, centre - matrix @ centre)
        elif kind == "scale":
            matrix = np.eye(2) / amount
            out[index] = _affine(image, matrix, centre - matrix @ centre)
        else:  # translation by ``amount`` pixels in a random direction
            direction = rng.uniform(0, 2 * np.pi)
            out[index] = _affine(image, np.eye(2), -amount * np.array([np.sin(direction), np.cos(direction)]))
    return np.clip(out, 0.0, 1.0)[:, None].astype(np.float32)


def shifted_fmnist(kind: str, level: int, part: str = "eval", n: int | None = None, seed: int = 0):
    """Fashion-MNIST ``part`` images (see ``fmnist_part``) under a shift, cached: ``(images, labels)``."""
    clean, labels = fmnist_part(part, n)
    images = _cached(f"fmnist-{part}-{len(clean)}-shift-{kind}-{level}-{seed}",
                     lambda: shift_images(clean, kind, level, seed))
    return images, labels
