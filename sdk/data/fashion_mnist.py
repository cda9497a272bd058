"""Real data sets read from local files: no downloads at run time."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from gradprobe.base.errors import DataError, InputError

FASHION_MNIST_DIR = Path(os.environ.get("GRADPROBE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format: magic, dims as big-endian uint32, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {directory}. Install Debian's package: "
        "`sudo apt-get install -y dataset-fashion-mnist` (or point GRADPROBE_FASHION_MNIST at a "
        "folder holding the four IDX files).")


def fashion_mnist(split: str = "test", directory: str | os.PathLike | None = None):
    """Return ``(images float32 [N,1,28,28] in [0,1], labels int64 [N])`` for ``split`` 'train' or 'test'."""
    if split not in _FILES:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(directory) if directory is not None else FASHION_MNIST_DIR
    image_stem, label_stem = _FILES[split]
    images = _read_idx(_find(folder, image_stem))
    labels = _read_idx(_find(folder, label_stem))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return (images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64)
