"""The detector contract, its registry, and safe storage of fitted arrays (npz, never pickle)."""
from __future__ import annotations

import io
import zipfile
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from gradprobe.base.errors import BundleError, InputError, NotFittedError

#: name -> detector class; ``calibrate(kind=name)`` and bundles refer to detectors by these names.
DETECTORS: dict[str, type["Detector"]] = {}
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
#: A stored detector larger than this is refused before anything is decompressed.
MAX_ARRAY_BYTES = 256 << 20


def register_detector(cls):
    """Class decorator: make ``cls`` available as ``calibrate(kind=cls.name)`` and in bundles."""
    DETECTORS[cls.name] = cls
    return cls


class Detector(ABC):
    """Scores gradient features; **higher score means more anomalous** for every detector.

    Class attributes: ``name`` (registry key), ``layers`` ("all" per-layer norms when the bundle has
    them, or "last" Linear only, see ``features.gradient_features``) and ``supervised`` (``fit`` needs
    labels: 0 in-distribution, 1 anomalous). ``arrays`` declares the fitted arrays and their dims, in
    terms of F (feature count) and H (hidden size), so stored detectors are checked before use.
    """

    name: ClassVar[str]
    layers: ClassVar[str] = "all"
    supervised: ClassVar[bool] = False
    arrays: ClassVar[dict[str, tuple]] = {}

    def __init__(self, **options):
        self.options = options
        self.fitted: dict[str, np.ndarray] | None = None

    @abstractmethod
    def fit(self, features: np.ndarray, labels: np.ndarray | None = None) -> "Detector": ...

    @abstractmethod
    def _score(self, features: np.ndarray) -> np.ndarray: ...

    def score(self, features) -> np.ndarray:
        """[N] anomaly scores (higher = more anomalous) for features [N, F]."""
        if self.fitted is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; call fit(features"
                                 f"{', labels' if self.supervised else ''}) first")
        features = np.asarray(features, np.float64)
        expected = self.fitted["mean"].shape[0]
        if features.ndim != 2 or features.shape[1] != expected:
            raise InputError(f"{type(self).__name__} scores features [N, {expected}], got {list(features.shape)}")
        return self._score(features)

    __call__ = score

    def save(self) -> bytes:
        """The fitted arrays as npz bytes."""
        if self.fitted is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted; nothing to save")
        buffer = io.BytesIO()
        np.savez(buffer, **self.fitted)
        return buffer.getvalue()

    @classmethod
    def load(cls, data: bytes, feature_count: int) -> "Detector":
        """A detector from ``save()``'s bytes, every array checked (names, dims, dtype, finite) before use."""
        detector = cls()
        detector.fitted = _read_arrays(data, cls.arrays, feature_count, cls.name)
        return detector


def _read_arrays(data: bytes, declared: dict[str, tuple], feature_count: int, name: str) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename: info for info in archive.infolist()}
    except (zipfile.BadZipFile, ValueError, EOFError) as error:
        raise BundleError(f"the {name} detector file is not a valid npz archive: {error}") from error
    if set(members) != {f"{key}.npy" for key in declared}:
        raise BundleError(f"the {name} detector file holds {sorted(members)}, expected "
                          f"{sorted(f'{k}.npy' for k in declared)}")
    if sum(info.file_size for info in members.values()) > MAX_ARRAY_BYTES:
        raise BundleError(f"the {name} detector file declares more than {MAX_ARRAY_BYTES} bytes of arrays")
    sizes: dict[str, int] = {"F": feature_count}
    arrays = {}
    for key, dims in declared.items():
        with archive.open(members[f"{key}.npy"]) as handle:
            try:
                reader = _HEADER_READERS.get(np.lib.format.read_magic(handle))
                if reader is None:
                    raise ValueError("unknown npy format version")
                shape, fortran_order, dtype = reader(handle)
            except (ValueError, EOFError, SyntaxError) as error:
                raise BundleError(f"the {name} detector array {key!r} has a damaged header: {error}") from error
            if dtype != np.float64 or fortran_order or len(shape) != len(dims):
                raise BundleError(f"the {name} detector array {key!r} must be float64 with dims {list(dims)}, "
                                  f"got {dtype} {list(shape)}")
            for size, dim in zip(shape, dims):
                expected = sizes.setdefault(dim, size) if isinstance(dim, str) else dim
                if size != expected or size < 1:
                    raise BundleError(f"the {name} detector array {key!r} has shape {list(shape)}; expected dims "
                                      f"{list(dims)} with F = {feature_count}")
            if int(np.prod(shape)) * 8 != members[f"{key}.npy"].file_size - handle.tell():
                raise BundleError(f"the {name} detector array {key!r} is truncated or padded")
            array = np.frombuffer(handle.read(), dtype=np.float64).reshape(shape)
        if not np.isfinite(array).all():
            raise BundleError(f"the {name} detector array {key!r} holds NaN or Inf")
        arrays[key] = array
    return arrays
