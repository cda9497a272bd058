"""Out-of-distribution and corrupted inputs for Fashion-MNIST detectors: real or generated here, seeded.

Every set is float32 [N, 1, 28, 28] in [0, 1], like ``gradprobe.data.fashion_mnist``. Generated sets
are deterministic (seeded) and cached as uint8 .npy under ``$GRADPROBE_CACHE`` (default
``~/.cache/gradprobe``). Fit and evaluation parts of every set are disjoint, so a detector is never
scored on what it was fitted on. The corruptions are the 8 challenge types of docs/METHODS.md §1 at 5
levels, written in numpy/scipy because ``imagecorruptions`` refuses images under 32x32.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gradprobe.base.errors import DataError, InputError

SIZE = 28
#: OOD sources: name -> what it is.
OOD_SETS = {
    "digits": "scikit-learn's bundled handwritten digits (1797, 8x8), bilinear-resized to 28x28, scaled to [0, 1]",
    "photos": "28x28 grayscale patches of scikit-learn's bundled photos (china.jpg, flower.jpg), "
              "84x84 crops area-downsampled 3x",
    "gaussian": "Gaussian noise with Fashion-MNIST's pixel mean and std, clipped to [0, 1]",
    "uniform": "uniform noise in [0, 1]",
}
#: The 8 challenge types of docs/METHODS.md §1 (decolor becomes a contrast loss on grayscale).
CORRUPTIONS = ("noise", "lens_blur", "gaussian_blur", "dirty_lens", "exposure", "snow", "haze", "contrast")
LEVELS = (1, 2, 3, 4, 5)
#: Fashion-MNIST test split: a fixed permutation; detectors fit on "fit", are scored on "eval".
FMNIST_PARTS = {"fit": slice(0, 2000), "eval": slice(5000, 10000)}
_FMNIST_MEAN, _FMNIST_STD = 0.286, 0.353


def cache_dir() -> Path:
    return Path(os.environ.get("GRADPROBE_CACHE", Path.home() / ".cache" / "gradprobe"))


def _cached(name: str, make) -> np.ndarray:
    """Load ``name`` (uint8 [N,28,28]) from the cache or make it (float [N,1,28,28]) and store it."""
    path = cache_dir() / "ood" / f"{name}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)[:, None].astype(np.float32) / 255.0
        except (ValueError, OSError):
            pass  # a damaged cache entry is remade
    images = np.clip(make(), 0.0, 1.0).astype(np.float32)
    quantised = np.round(images[:, 0] * 255).astype(np.uint8)
    from gradprobe.base.fileio import atomic_path

    try:
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.save(handle, quantised)
    except OSError:
        pass  # a read-only home still gets the data, just not cached
    return quantised[:, None].astype(np.float32) / 255.0


def _split(n_total: int, split: str, fit_size: int) -> slice:
    if split not in ("fit", "eval"):
        raise InputError(f"split must be 'fit' or 'eval', got {split!r}")
    return slice(0, fit_size) if split == "fit" else slice(fit_size, n_total)


def fmnist_part(part: str, n: int | None = None):
    """Disjoint parts of the Fashion-MNIST test split: ``(images, labels)`` for 'fit' or 'eval'."""
    from .fashion_mnist import fashion_mnist

    if part not in FMNIST_PARTS:
        raise InputError(f"part must be one of {sorted(FMNIST_PARTS)}, got {part!r}")
    images, labels = fashion_mnist("test")
    index = np.random.default_rng(0).permutation(len(images))[FMNIST_PARTS[part]][:n]
    return images[index], labels[index]


def _digits() -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DataError("the 'digits' OOD set needs scikit-learn: pip install scikit-learn") from error
    from scipy.ndimage import zoom

    raw = load_digits().images.astype(np.float64) / 16.0  # 0..16 -> [0, 1], FMNIST's range
    order = np.random.default_rng(0).permutation(len(raw))  # classes are interleaved; shuffle once
    return zoom(raw[order], (1, SIZE / 8, SIZE / 8), order=1)[:, None]


def _photos(split: str, n: int, seed: int) -> np.ndarray:
    """Crops from the left 60% of each photo for 'fit', from the right 40% for 'eval' (disjoint pixels)."""
    try:
        from sklearn.datasets import load_sample_images
        photos = load_sample_images().images
    except ImportError as error:
        raise DataError("the 'photos' OOD set needs scikit-learn and Pillow: "
                        "pip install scikit-learn pillow") from error
    crop = 3 * SIZE
    rng = np.random.default_rng([seed, 0 if split == "fit" else 1])
    out = np.empty((n, 1, SIZE, SIZE))
    for i in range(n):
        gray = photos[i % len(photos)].astype(np.float64).mean(axis=2) / 255.0
        height, width = gray.shape
        cut = int(width * 0.6)
        lo, hi = (0, cut - crop) if split == "fit" else (cut, width - crop)
        y, x = rng.integers(0, height - crop), rng.integers(lo, hi)
        out[i, 0] = gray[y:y + crop, x:x + crop].reshape(SIZE, 3, SIZE, 3).mean(axis=(1, 3))
    return out


def ood_set(name: str, split: str = "eval", n: int | None = None, seed: int = 0) -> np.ndarray:
    """OOD images float32 [N,1,28,28] in [0,1]: ``name`` from ``OOD_SETS``; 'fit' and 'eval' are disjoint."""
    if name not in OOD_SETS:
        raise InputError(f"unknown OOD set {name!r}; expected one of {sorted(OOD_SETS)}")
    if name == "digits":
        images = _digits()
        return images[_split(len(images), split, 600)][:n].astype(np.float32)
    _split(0, split, 0)
    n = 1000 if n is None else n
    part = 0 if split == "fit" else 1
    if name == "photos":
        return _cached(f"photos-{split}-{n}-{seed}", lambda: _photos(split, n, seed))
    rng = np.random.default_rng([seed, part, 1 if name == "gaussian" else 2])
    shape = (n, 1, SIZE, SIZE)
    if name == "gaussian":
        return np.clip(rng.normal(_FMNIST_MEAN, _FMNIST_STD, shape), 0, 1).astype(np.float32)
    return rng.random(shape, dtype=np.float32)


# -- corruptions ------------------------------------------------------------------------------------

def _smooth_field(rng, n: int, sigma: float) -> np.ndarray:
    """Low-frequency random field in [0, 1], one per image: smudges, fog density."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.random((n, SIZE, SIZE)), (0, sigma, sigma), mode="wrap")
    low, high = field.min(axis=(1, 2), keepdims=True), field.max(axis=(1, 2), keepdims=True)
    return (field - low) / np.maximum(high - low, 1e-12)


def _disk(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    kernel = (x * x + y * y <= radius * radius + 1e-9).astype(np.float64)
    return kernel / kernel.sum()


def _corrupt(x: np.ndarray, kind: str, level: int, rng) -> np.ndarray:
    """x float64 [N, 28, 28] in [0, 1] -> the corrupted images (not yet clipped)."""
    from scipy import ndimage

    k = level - 1
    n = len(x)
    if kind == "noise":  # additive Gaussian sensor noise
        return x + rng.normal(0, (0.04, 0.08, 0.12, 0.18, 0.26)[k], x.shape)
    if kind == "lens_blur":  # defocus: a disk kernel
        return ndimage.convolve(x, _disk((1.0, 1.5, 2.0, 2.5, 3.0)[k])[None], mode="reflect")
    if kind == "gaussian_blur":
        sigma = (0.5, 0.75, 1.0, 1.5, 2.0)[k]
        return ndimage.gaussian_filter(x, (0, sigma, sigma), mode="reflect")
    if kind == "dirty_lens":  # gray smudges of growing opacity, over a slightly blurred image
        alpha = (0.25, 0.4, 0.55, 0.7, 0.85)[k] * _smooth_field(rng, n, 3.0) ** 2
        blurred = ndimage.gaussian_filter(x, (0, 1.0, 1.0), mode="reflect")
        return (1 - alpha) * blurred + alpha * 0.45
    if kind == "exposure":  # over-exposure: gain and lift, then the sensor saturates
        gain, lift = (1.2, 1.4, 1.7, 2.0, 2.4)[k], (0.05, 0.1, 0.2, 0.3, 0.4)[k]
        return x * gain + lift
    if kind == "snow":  # blurred bright flakes and a white veil
        density, veil = (0.01, 0.02, 0.035, 0.05, 0.07)[k], (0.05, 0.1, 0.15, 0.2, 0.3)[k]
        flakes = (rng.random(x.shape) < density).astype(np.float64)
        flakes = ndimage.gaussian_filter(flakes, (0, 0.5, 0.5)) * 2.5
        return x * (1 - veil) + veil * 0.9 + flakes
    if kind == "haze":  # fog: blend towards a bright airlight with an uneven transmission
        depth = (0.2, 0.35, 0.5, 0.65, 0.8)[k] * (0.7 + 0.3 * _smooth_field(rng, n, 4.0))
        return x * (1 - depth) + 0.75 * depth
    if kind == "contrast":  # decolor on grayscale: the image fades to its mean
        factor = (0.7, 0.5, 0.35, 0.2, 0.1)[k]
        mean = x.mean(axis=(1, 2), keepdims=True)
        return (x - mean) * factor + mean
    raise InputError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


def corrupt(images: np.ndarray, kind: str, level: int, seed: int = 0) -> np.ndarray:
    """``images`` [N,1,28,28] in [0,1] under corruption ``kind`` at ``level`` 1..5, deterministic in ``seed``."""
    if kind not in CORRUPTIONS:
        raise InputError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, got {level!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (1, SIZE, SIZE):
        raise InputError(f"images must have shape [N, 1, {SIZE}, {SIZE}], got {list(images.shape)}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(kind), level])
    out = _corrupt(images[:, 0].astype(np.float64), kind, level, rng)
    return np.clip(out, 0.0, 1.0)[:, None].astype(np.float32)


def corrupted_fmnist(kind: str, level: int, part: str = "eval", n: int | None = None, seed: int = 0):
    """Fashion-MNIST ``part`` images under a corruption, cached: ``(images, labels)``."""
    clean, labels = fmnist_part(part, n)
    images = _cached(f"fmnist-{part}-{len(clean)}-{kind}-{level}-{seed}", lambda: corrupt(clean, kind, level, seed))
    return images, labels
