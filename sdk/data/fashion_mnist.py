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


def fashion_mnist_pooled(directory: str | os.PathLike | None = None):
    """Train and test splits pooled (70,000 images), as the GPND protocol starts from."""
    train_images, train_labels = fashion_mnist("train", directory)
    test_images, test_labels = fashion_mnist("test", directory)
    return np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])


def gpnd_folds(labels: np.ndarray, seed: int = 0, folds: int = 5) -> np.ndarray:
    """Fold id per sample (-1: left over): each class shuffled and cut into ``folds`` equal folds.

    The GPND protocol (Pidhorskyi et al. 2018, as GradCon's prep_datasets.py implements it) uses folds
    0-2 for training, 3 for validation, 4 for test.
    """
    labels = np.asarray(labels)
    fold = np.full(len(labels), -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        size = len(members) // folds
        for index in range(folds):
            fold[members[index * size:(index + 1) * size]] = index
    return fold


def gpnd_split(labels: np.ndarray, folds: np.ndarray, normal_class: int, outlier_percent: int,
               seed: int = 0) -> dict:
    """Indices for one normal class and one outlier percentage of the GPND protocol.

    ``train``: normal samples of folds 0-2. ``val`` and ``test``: every normal sample of fold 3 (4) plus
    ``int(n·p // (100 − p))`` outliers drawn at random from the other classes of the same fold, so outliers
    are ``p`` % of the set; ``val_outlier``/``test_outlier`` flag them. The F1 threshold is chosen on ``val``.
    """
    labels, folds = np.asarray(labels), np.asarray(folds)
    if not 0 < outlier_percent < 100:
        raise InputError(f"outlier_percent must be in (0, 100), got {outlier_percent}")
    if normal_class not in set(labels.tolist()):
        raise InputError(f"normal_class {normal_class} is not a label of the data (labels {sorted(set(labels.tolist()))})")
    rng = np.random.default_rng([seed, normal_class, outlier_percent])
    normal = labels == normal_class
    split = {"train": np.flatnonzero(normal & np.isin(folds, (0, 1, 2)))}
    for name, fold in (("val", 3), ("test", 4)):
        inliers = np.flatnonzero(normal & (folds == fold))
        candidates = np.flatnonzero(~normal & (folds == fold))
        count = int(len(inliers) * outlier_percent // (100 - outlier_percent))
        outliers = np.sort(rng.choice(candidates, size=count, replace=False))
        split[name] = np.concatenate([inliers, outliers])
        split[f"{name}_outlier"] = np.r_[np.zeros(len(inliers), bool), np.ones(count, bool)]
    return split
