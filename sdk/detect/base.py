"""The detector contract, its registry, and safe storage of fitted arrays (npz, never pickle)."""
from __future__ import annotations

import contextlib
import io
import math
import zipfile
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from gradprobe.base.errors import BundleError, InputError, NotFittedError
from gradprobe.base.manifest import MAX_DETECTOR_ARRAY_BYTES

#: name -> detector class; ``calibrate(kind=name)`` and bundles refer to detectors by these names.
DETECTORS: dict[str, type["Detector"]] = {}
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
#: A stored detector larger than this is refused before anything is decompressed.
MAX_ARRAY_BYTES = MAX_DETECTOR_ARRAY_BYTES


def register_detector(cls):
    """Class decorator: make ``cls`` available as ``calibrate(kind=cls.name)`` and in bundles."""
    DETECTORS[cls.name] = cls
    return cls


class Detector(ABC):
    """Scores gradient features; **higher score means more anomalous** for every detector.

    Class attributes: ``name`` (registry key), ``layers`` ("all" per-layer norms when the bundle has
    them, or "last" Linear only, see ``features.gradient_features``) and ``supervised`` (``fit`` needs
    labels: 0 in-distribution, 1 anomalous). ``arrays`` declares the fitted arrays and their dims, in
    terms of F (feature count) and H (hidden size), so stored detectors are checked before use;
    ``positive`` names those that must be > 0.
    """

    name: ClassVar[str]
    layers: ClassVar[str] = "all"
    supervised: ClassVar[bool] = False
    arrays: ClassVar[dict[str, tuple]] = {}
    #: Arrays that must be strictly positive (e.g. a standard deviation the features are divided by).
    positive: ClassVar[tuple] = ()

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
        detector.fitted = _read_arrays(data, cls.arrays, feature_count, cls.name, cls.positive)
        return detector


_COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}


@contextlib.contextmanager
def _parsing(what: str):
    """Turn whatever zipfile, zlib or numpy's header parser raise on damaged bytes into a BundleError."""
    try:
        yield
    except BundleError:
        raise
    except Exception as error:  # BadZipFile, zlib.error, EOFError, OSError, ValueError, SyntaxError, TokenError...
        raise BundleError(f"{what}: {type(error).__name__}: {str(error)[:200]}") from error


def _read_arrays(data: bytes, declared: dict[str, tuple], feature_count: int, name: str,
                 positive: tuple = ()) -> dict[str, np.ndarray]:
    """The declared arrays of an npz, each checked (names, dims, dtype, size, finite) before it is read."""
    with _parsing(f"the {name} detector file is not a valid npz archive"):
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise BundleError(f"the {name} detector file holds duplicate members {sorted(names)}; it was not written "
                          "by gradprobe")
    members = {info.filename: info for info in infos}
    if set(members) != {f"{key}.npy" for key in declared}:
        raise BundleError(f"the {name} detector file holds {sorted(members)}, expected "
                          f"{sorted(f'{k}.npy' for k in declared)}")
    for info in infos:
        if info.flag_bits & 0x1:
            raise BundleError(f"the {name} detector file's {info.filename} is encrypted; gradprobe writes plain npz")
        if info.compress_type not in _COMPRESSIONS:
            raise BundleError(f"the {name} detector file's {info.filename} uses compression method "
                              f"{info.compress_type}; expected one of {sorted(_COMPRESSIONS.values())}")
    if sum(info.file_size for info in infos) > MAX_ARRAY_BYTES:
        raise BundleError(f"the {name} detector file declares more than {MAX_ARRAY_BYTES} bytes of arrays")
    sizes: dict[str, int] = {"F": feature_count}
    arrays = {}
    for key, dims in declared.items():
        info = members[f"{key}.npy"]
        with _parsing(f"the {name} detector array {key!r} has a damaged header or data"), archive.open(info) as handle:
            reader = _HEADER_READERS.get(np.lib.format.read_magic(handle))
            if reader is None:
                raise BundleError(f"the {name} detector array {key!r} has a damaged header: unknown npy version")
            shape, fortran_order, dtype = reader(handle)
            if dtype != np.float64 or fortran_order or len(shape) != len(dims):
                raise BundleError(f"the {name} detector array {key!r} must be float64 with dims {list(dims)}, "
                                  f"got {dtype} {list(shape)}")
            for size, dim in zip(shape, dims):
                expected = sizes.setdefault(dim, size) if isinstance(dim, str) else dim
                if size != expected or size < 1:
                    raise BundleError(f"the {name} detector array {key!r} has shape {list(shape)}; expected dims "
                                      f"{list(dims)} with F = {feature_count}")
            nbytes = math.prod(shape) * 8
            if nbytes > MAX_ARRAY_BYTES:
                raise BundleError(f"the {name} detector array {key!r} declares more than {MAX_ARRAY_BYTES} bytes")
            if nbytes != info.file_size - handle.tell():
                raise BundleError(f"the {name} detector array {key!r} is truncated or padded")
            array = np.frombuffer(handle.read(nbytes), dtype=np.float64)
        if array.size != math.prod(shape):
            raise BundleError(f"the {name} detector array {key!r} is truncated")
        array = array.reshape(shape)
        if not np.isfinite(array).all():
            raise BundleError(f"the {name} detector array {key!r} holds NaN or Inf")
        if key in positive and not (array > 0).all():
            raise BundleError(f"the {name} detector array {key!r} must be positive (it divides the features)")
        arrays[key] = array
    return arrays
