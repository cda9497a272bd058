"""The bundle manifest as typed, validated data: one reader (``Manifest.from_json``), one writer (``to_json``).

A manifest is read by services that did not write it, so every field is checked for type, range and
consistency with the others before anything uses it; each failure is a ``BundleError`` that names the
field and what was expected. Kinds of bundle (``kind``) each have one typed section, registered in
``SECTIONS``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from .errors import BundleError
from .fileio import check_plain_name

FORMAT = "gradprobe-bundle"
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SCORE_ORIENTATION = "higher means more anomalous"
#: Upper bounds that keep a damaged manifest from asking for absurd work or memory.
MAX_FILE_BYTES = 4 << 30
MAX_MANIFEST_BYTES = 16 << 20
#: A graph is one protobuf message, which cannot exceed 2 GiB: larger models keep their weights beside it.
MAX_GRAPH_BYTES = 2 << 30
#: numpy dtypes that weights kept beside the graph may have (with their item sizes), and the alignment of each
#: tensor in their file.
WEIGHT_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
WEIGHT_DTYPES = tuple(WEIGHT_ITEMSIZE)
WEIGHT_ALIGNMENT = 64
#: Fitted detector arrays (uncompressed) and the npz file that holds them.
MAX_DETECTOR_ARRAY_BYTES = 256 << 20
MAX_DETECTOR_BYTES = MAX_DETECTOR_ARRAY_BYTES + (1 << 20)
MAX_DIM = 1 << 16
MAX_ITEMS = 1 << 16
DTYPES = ("float32", "float64", "int64")
FLOAT_DTYPES = ("float32", "float64")
#: The outputs a detector may read its features from (gradient norms).
DETECTOR_FEATURES = ("layer_grad_sqnorm", "confounding_grad_sqnorm")

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


# ------------------------------------------------------------------------------------ field checks
def _fail(path: str, expected: str, value) -> BundleError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return BundleError(f"manifest field {path}: expected {expected}, got {shown} ({type(value).__name__})")


def _get(data: dict, key: str, path: str, default=...):
    if key not in data:
        if default is ...:
            raise BundleError(f"manifest field {path}.{key} is missing" if path else f"manifest field {key} is missing")
        return default
    return data[key]


def _dict(value, path: str) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, "an object", value)
    return value


def _int(value, path: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(path, f"an integer in [{low}, {high}]", value)
    return value


def _float(value, path: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(path, "a finite number", value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(path, f"a number in [{low}, {high}]", value)
    return float(value)


def _str(value, path: str, choices=None, pattern: re.Pattern | None = None, max_length: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > max_length:
        raise _fail(path, f"a string of at most {max_length} characters", value)
    if choices is not None and value not in choices:
        raise _fail(path, f"one of {list(choices)}", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(path, "valid Unicode text (no lone surrogates)", value) from None
    if pattern is not None and not pattern.fullmatch(value):
        raise _fail(path, f"a name matching {pattern.pattern}", value)
    return value


def _list(value, path: str, item: Callable[[Any, str], Any], length: int | None = None,
          max_length: int = MAX_ITEMS) -> tuple:
    if not isinstance(value, list) or len(value) > max_length:
        raise _fail(path, f"a list of at most {max_length} items", value)
    if length is not None and len(value) != length:
        raise _fail(path, f"a list of {length} items", value)
    return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))


def _json_value(value, path: str, depth: int = 0):
    """Free-form informational data (descriptions, export notes): plain JSON, bounded depth; a non-finite
    number becomes its name ("nan", "inf"), on reading and on writing alike."""
    if depth > 8:
        raise _fail(path, "JSON nested at most 8 levels", "...")
    if isinstance(value, dict):
        return {_str(k, f"{path} key"): _json_value(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    raise _fail(path, "JSON data", value)


def _dim(value, path: str):
    if isinstance(value, str):
        return _str(value, path, pattern=_IDENTIFIER, max_length=32)
    return _int(value, path, 1, MAX_DIM)


def _name(value, path: str) -> str:
    return _str(value, path, pattern=_IDENTIFIER, max_length=200)


# -------------------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class FileRecord:
    """A file of the bundle: its sha256 and size, checked before it is used."""

    sha256: str
    bytes: int

    @classmethod
    def from_json(cls, data, path: str) -> "FileRecord":
        data = _dict(data, path)
        digest = _str(_get(data, "sha256", path), f"{path}.sha256", pattern=re.compile(r"^[0-9a-f]{64}$"))
        return cls(digest, _int(_get(data, "bytes", path), f"{path}.bytes", 0, MAX_FILE_BYTES))

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class WeightTensor:
    """One initializer of the graph whose data lies in the weights file: where, and what it holds."""

    name: str
    dtype: str
    shape: tuple
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * WEIGHT_ITEMSIZE[self.dtype]

    @classmethod
    def from_json(cls, data, path: str) -> "WeightTensor":
        data = _dict(data, path)
        name = _str(_get(data, "name", path), f"{path}.name", max_length=400)
        if not name:
            raise _fail(f"{path}.name", "a non-empty initializer name", name)
        offset = _int(_get(data, "offset", path), f"{path}.offset", 0, MAX_FILE_BYTES)
        if offset % WEIGHT_ALIGNMENT:
            raise _fail(f"{path}.offset", f"a multiple of {WEIGHT_ALIGNMENT}", offset)
        shape = _list(_get(data, "shape", path), f"{path}.shape",
                      lambda value, where: _int(value, where, 0, MAX_FILE_BYTES), max_length=8)
        return cls(name, _str(_get(data, "dtype", path), f"{path}.dtype", WEIGHT_DTYPES), shape, offset)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


@dataclass(frozen=True)
class GraphWeights:
    """The graph's large initializers, kept in a file of their own (a model over 2 GiB: one protobuf cannot
    hold it). The runtime hands them to the engine from the checked bytes, so no path inside the graph is
    ever opened."""

    file: str
    tensors: tuple  # WeightTensor

    @classmethod
    def from_json(cls, data, path: str) -> "GraphWeights":
        data = _dict(data, path)
        file = check_plain_name(_get(data, "file", path), f"manifest field {path}.file")
        tensors = _list(_get(data, "tensors", path), f"{path}.tensors", WeightTensor.from_json)
        names = [tensor.name for tensor in tensors]
        if not tensors or len(set(names)) != len(names):
            raise _fail(f"{path}.tensors", "a non-empty list of distinct initializer names", names[:5])
        return cls(file, tensors)

    def check_against(self, files: dict, graph: str) -> None:
        """Every tensor inside the listed weights file, which is not the graph itself."""
        if self.file == graph or self.file not in files:
            raise BundleError(f"manifest field graph.weights.file: {self.file!r} must be a file listed in files, "
                              "apart from the graph")
        size = files[self.file].bytes
        for index, tensor in enumerate(self.tensors):
            if tensor.offset + tensor.nbytes > size:
                raise BundleError(f"manifest field graph.weights.tensors[{index}] ({tensor.name}): bytes "
                                  f"{tensor.offset}..{tensor.offset + tensor.nbytes} lie beyond the end of "
                                  f"{self.file} ({size} bytes)")

    def to_json(self) -> dict:
        return {"file": self.file, "tensors": [tensor.to_json() for tensor in self.tensors]}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dtype, shape (an int per fixed dim, a name such as "B" per free one)."""

    name: str
    dtype: str
    shape: tuple
    meaning: str = ""

    @classmethod
    def from_json(cls, data, path: str) -> "TensorSpec":
        data = _dict(data, path)
        return cls(_name(_get(data, "name", path), f"{path}.name"),
                   _str(_get(data, "dtype", path), f"{path}.dtype", DTYPES),
                   _list(_get(data, "shape", path), f"{path}.shape", _dim, max_length=8),
                   _str(data.get("meaning", ""), f"{path}.meaning"))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}


@dataclass(frozen=True)
class InputSpec:
    """The images a bundle takes: [B, C, H, W] float32 in ``range``, normalised inside the graph."""

    shape: tuple          # (C, H, W)
    range: tuple          # (low, high)
    mean: tuple           # one per channel
    std: tuple            # one per channel, positive

    @classmethod
    def from_json(cls, data, path: str) -> "InputSpec":
        data = _dict(data, path)
        shape = _get(data, "shape", path)
        if not isinstance(shape, list) or len(shape) != 4 or shape[0] is not None:
            raise _fail(f"{path}.shape", "[null, C, H, W]", shape)
        chw = tuple(_int(v, f"{path}.shape[{i + 1}]", 1, MAX_DIM) for i, v in enumerate(shape[1:]))
        if chw[0] * chw[1] * chw[2] > 1 << 26:
            raise _fail(f"{path}.shape", "at most 2^26 values per image", shape)
        _str(_get(data, "dtype", path), f"{path}.dtype", ("float32",))
        low, high = _list(_get(data, "range", path), f"{path}.range", _float, length=2)
        if not low < high:
            raise _fail(f"{path}.range", "[low, high] with low < high", [low, high])
        normalize = _dict(_get(data, "normalize", path), f"{path}.normalize")
        mean = _list(_get(normalize, "mean", f"{path}.normalize"), f"{path}.normalize.mean", _float, length=chw[0])
        std = _list(_get(normalize, "std", f"{path}.normalize"), f"{path}.normalize.std",
                    lambda v, p: _float(v, p, 1e-12), length=chw[0])
        return cls(chw, (low, high), mean, std)

    def to_json(self) -> dict:
        return {"shape": [None, *self.shape], "dtype": "float32", "range": list(self.range),
                "normalize": {"mean": list(self.mean), "std": list(self.std)}}


@dataclass(frozen=True)
class ModelInfo:
    """What was exported (informational) and, for reference models, where its weights are."""

    class_name: str
    parameters: int
    weights: str | None = None
    config: dict | None = None

    @classmethod
    def from_json(cls, data, path: str) -> "ModelInfo":
        data = _dict(data, path)
        weights = data.get("weights")
        config = data.get("config")
        return cls(_str(_get(data, "class", path), f"{path}.class", max_length=200),
                   _int(_get(data, "parameters", path), f"{path}.parameters", 0, 1 << 40),
                   None if weights is None else check_plain_name(weights, f"manifest field {path}.weights"),
                   None if config is None else _json_value(_dict(config, f"{path}.config"), f"{path}.config"))

    def to_json(self) -> dict:
        return {"class": self.class_name, "parameters": self.parameters, "weights": self.weights,
                "config": None if self.config is None else _json_value(self.config, "model.config")}


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry as the bundle stores it and the norm kernels read it (a Linear is a 1x1 conv)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def patch_size(self) -> int:
        """Length of one group's input patch a_t: in_channels/groups * kh * kw."""
        return self.in_channels // self.groups * self.kernel[0] * self.kernel[1]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        size = []
        for extent, k, s, p, d in zip((height, width), self.kernel, self.stride, self.padding, self.dilation):
            size.append((extent + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(size)

    @classmethod
    def from_json(cls, data, path: str) -> "ConvSpec":
        data = _dict(data, path)

        def pair(key, low, high):
            return _list(_get(data, key, path), f"{path}.{key}", lambda v, p: _int(v, p, low, high), length=2)

        spec = cls(_int(_get(data, "in_channels", path), f"{path}.in_channels", 1, MAX_DIM),
                   _int(_get(data, "out_channels", path), f"{path}.out_channels", 1, MAX_DIM),
                   pair("kernel", 1, 64), pair("stride", 1, 64), pair("padding", 0, 64), pair("dilation", 1, 64),
                   _int(_get(data, "groups", path), f"{path}.groups", 1, MAX_DIM))
        if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
            raise _fail(f"{path}.groups", "a divisor of in_channels and out_channels", spec.groups)
        return spec

    def to_json(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups}


@dataclass(frozen=True)
class MapSpec:
    """One explanation map the graph emits: S's gradient at the target layer, weighted, signed (see export.maps)."""

    name: str
    target: str             # the scalar S whose gradient weights the channels
    weighting: str          # how the channel weights come from the gradient
    sign: int               # +1, or -1 for "what if not"
    question: str           # caption with {P} and {Q} placeholders
    uses_contrast: bool     # depends on the contrast class Q

    @classmethod
    def from_json(cls, data, path: str) -> "MapSpec":
        data = _dict(data, path)
        uses = _get(data, "uses_contrast", path)
        if not isinstance(uses, bool):
            raise _fail(f"{path}.uses_contrast", "true or false", uses)
        sign = _get(data, "sign", path)
        if sign not in (1, -1) or isinstance(sign, bool):
            raise _fail(f"{path}.sign", "1 or -1", sign)
        return cls(_name(_get(data, "name", path), f"{path}.name"), _name(_get(data, "target", path), f"{path}.target"),
                   _name(_get(data, "weighting", path), f"{path}.weighting"), sign,
                   _str(_get(data, "question", path), f"{path}.question", max_length=200), uses)

    def to_json(self) -> dict:
        return {"name": self.name, "target": self.target, "weighting": self.weighting, "sign": self.sign,
                "question": self.question, "uses_contrast": self.uses_contrast}


@dataclass(frozen=True)
class Tap:
    """A conv weight whose per-sample norm the kernels complete from the layer input and output gradient."""

    column: int
    input: str
    grad: str
    conv: ConvSpec

    @classmethod
    def from_json(cls, data, path: str) -> "Tap":
        data = _dict(data, path)
        return cls(_int(_get(data, "column", path), f"{path}.column", 0, MAX_ITEMS),
                   _name(_get(data, "input", path), f"{path}.input"), _name(_get(data, "grad", path), f"{path}.grad"),
                   ConvSpec.from_json(_get(data, "conv", path), f"{path}.conv"))

    def to_json(self) -> dict:
        return {"column": self.column, "input": self.input, "grad": self.grad, "conv": self.conv.to_json()}


PRECISIONS = ("fp32", "fp16")
MAX_ENGINE_BATCH = 1 << 16
_ENGINE_FILE = re.compile(r"^engine-[0-9a-f]{16}\.plan$")
_VERSION = re.compile(r"^[0-9]+(\.[0-9]+){1,3}$")
_ENGINE_KEYS = ("file", "tensorrt", "gpu", "compute_capability", "precision", "profile", "workspace_mib",
                "graph_sha256", "built")


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine built from the bundle's graph: usable only with the same TensorRT version, GPU,
    compute capability and graph; ``profile`` is the batch range (min, opt, max) it was optimised for."""

    file: str
    tensorrt: str
    gpu: str
    compute_capability: tuple     # (major, minor)
    precision: str
    profile: tuple                # (min, opt, max) batch sizes
    graph_sha256: str
    workspace_mib: int | None = None
    built: str = ""

    @property
    def key(self) -> tuple:
        """What makes two engines interchangeable: one record per key in a manifest."""
        return (self.tensorrt, self.gpu, self.compute_capability, self.precision, self.profile)

    @classmethod
    def from_json(cls, data, path: str) -> "EngineRecord":
        data = _dict(data, path)
        unknown = sorted(set(data) - set(_ENGINE_KEYS))
        if unknown:
            raise _fail(path, f"only the keys {list(_ENGINE_KEYS)}", unknown)
        capability = _list(_get(data, "compute_capability", path), f"{path}.compute_capability",
                           lambda v, p: _int(v, p, 0, 99), length=2)
        profile_data = _dict(_get(data, "profile", path), f"{path}.profile")
        if sorted(profile_data) != ["max", "min", "opt"]:
            raise _fail(f"{path}.profile", "an object with exactly min, opt and max", sorted(profile_data))
        profile = tuple(_int(profile_data[k], f"{path}.profile.{k}", 1, MAX_ENGINE_BATCH)
                        for k in ("min", "opt", "max"))
        if not profile[0] <= profile[1] <= profile[2]:
            raise _fail(f"{path}.profile", "min <= opt <= max", dict(zip(("min", "opt", "max"), profile)))
        workspace = data.get("workspace_mib")
        return cls(_str(check_plain_name(_get(data, "file", path), f"manifest field {path}.file"), f"{path}.file",
                        pattern=_ENGINE_FILE),
                   _str(_get(data, "tensorrt", path), f"{path}.tensorrt", pattern=_VERSION, max_length=32),
                   _str(_get(data, "gpu", path), f"{path}.gpu", max_length=200),
                   capability, _str(_get(data, "precision", path), f"{path}.precision", PRECISIONS), profile,
                   _str(_get(data, "graph_sha256", path), f"{path}.graph_sha256",
                        pattern=re.compile(r"^[0-9a-f]{64}$")),
                   None if workspace is None else _int(workspace, f"{path}.workspace_mib", 1, 1 << 20),
                   _str(data.get("built", ""), f"{path}.built", max_length=64))

    def to_json(self) -> dict:
        return {"file": self.file, "tensorrt": self.tensorrt, "gpu": self.gpu,
                "compute_capability": list(self.compute_capability), "precision": self.precision,
                "profile": dict(zip(("min", "opt", "max"), self.profile)), "workspace_mib": self.workspace_mib,
                "graph_sha256": self.graph_sha256, "built": self.built}


CONFOUNDING_LOSSES = ("bce", "softmax")
#: The classifier graph's fixed outputs: name -> (dtype, dims after the batch; "C" = one per class name,
#: "d" = head.features). Maps, layer_grad_sqnorm and taps follow from their sections.
CLASSIFIER_OUTPUTS = {"logits": ("float", ("C",)), "probs": ("float", ("C",)), "pred": ("int64", ()),
                      "features": ("float", ("d",)), "contrast_class": ("int64", ()),
                      "label_grad_sqnorm": ("float", ("C",)), "confounding_grad_sqnorm": ("float", (2,))}
NORM_FORMS = ("closed", "gram", "tap", "generic")


@dataclass(frozen=True)
class LayerGrads:
    """Per-sample gradient norms of every parameter tensor (``layer_grad_sqnorm`` columns)."""

    confounding: str
    names: tuple
    forms: tuple
    taps: tuple = ()

    @classmethod
    def from_json(cls, data, path: str) -> "LayerGrads":
        data = _dict(data, path)
        names = _list(_get(data, "names", path), f"{path}.names", lambda v, p: _str(v, p, max_length=400))
        forms = _list(_get(data, "forms", path), f"{path}.forms", lambda v, p: _str(v, p, NORM_FORMS),
                      length=len(names))
        taps = _list(_get(data, "taps", path), f"{path}.taps", Tap.from_json)
        columns = [tap.column for tap in taps]
        if len(set(columns)) != len(columns):
            raise _fail(f"{path}.taps", "one tap per column", columns)
        expected = [i for i, form in enumerate(forms) if form == "tap"]
        if sorted(columns) != expected:
            raise _fail(f"{path}.taps", f"taps for exactly the 'tap' columns {expected}", columns)
        return cls(_str(_get(data, "confounding", path), f"{path}.confounding", CONFOUNDING_LOSSES), names, forms, taps)

    def to_json(self) -> dict:
        return {"confounding": self.confounding, "names": list(self.names), "forms": list(self.forms),
                "taps": [tap.to_json() for tap in self.taps]}


@dataclass(frozen=True)
class DetectorSection:
    """A calibrated detector: its registered kind, weights file, feature source, threshold and fit data."""

    kind: str
    file: str
    features: str
    feature_count: int
    threshold: float
    tpr: float
    fit: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data, path: str) -> "DetectorSection":
        data = _dict(data, path)
        if data.get("score_orientation", SCORE_ORIENTATION) != SCORE_ORIENTATION:
            raise _fail(f"{path}.score_orientation", repr(SCORE_ORIENTATION), data.get("score_orientation"))
        return cls(_name(_get(data, "kind", path), f"{path}.kind"),
                   check_plain_name(_get(data, "file", path), f"manifest field {path}.file"),
                   _str(_get(data, "features", path), f"{path}.features", DETECTOR_FEATURES),
                   _int(_get(data, "feature_count", path), f"{path}.feature_count", 1, MAX_ITEMS),
                   _float(_get(data, "threshold", path), f"{path}.threshold"),
                   _float(_get(data, "tpr", path), f"{path}.tpr", 0.5, 1.0),
                   _json_value(_dict(data.get("fit", {}), f"{path}.fit"), f"{path}.fit"))

    def to_json(self) -> dict:
        return {"kind": self.kind, "file": self.file, "features": self.features, "feature_count": self.feature_count,
                "threshold": self.threshold, "tpr": self.tpr, "score_orientation": SCORE_ORIENTATION,
                "is_anomalous": "score > threshold, or any output not finite",
                "fit": _json_value(self.fit, "detector.fit")}


#: Variants of the contrastive feature r_x (METHODS.md §4) -> shape of one image's r_x from (C classes, d features).
CONTRASTIVE_SHAPES = {"full": lambda c, d: (c, c, d), "compact": lambda c, d: (c, d), "norms": lambda c, d: (c,)}


@dataclass(frozen=True)
class ContrastiveFeatures:
    """The contrastive features r_x the graph emits, one output ``contrastive_<variant>`` per variant."""

    variants: tuple

    @staticmethod
    def output_name(variant: str) -> str:
        return f"contrastive_{variant}"

    @classmethod
    def from_json(cls, data, path: str) -> "ContrastiveFeatures":
        data = _dict(data, path)
        variants = _list(_get(data, "variants", path), f"{path}.variants",
                         lambda v, p: _str(v, p, tuple(CONTRASTIVE_SHAPES)), max_length=len(CONTRASTIVE_SHAPES))
        if not variants or len(set(variants)) != len(variants):
            raise _fail(f"{path}.variants", f"distinct variants among {list(CONTRASTIVE_SHAPES)}, at least one",
                        list(variants))
        return cls(variants)

    def to_json(self) -> dict:
        return {"variants": list(self.variants)}

    def expected_outputs(self, classes: int, features: int) -> dict:
        """Output name -> (dtype, dims after the batch, where they come from) for every variant."""
        return {self.output_name(variant): ("float32", CONTRASTIVE_SHAPES[variant](classes, features),
                                            f"classifier.contrastive.variants ({variant}: C={classes}, d={features})")
                for variant in self.variants}


#: Outputs a head named "contrastive" must declare (dtype, shape from C) for ``Probe.contrastive_predict``.
CONTRASTIVE_HEAD_OUTPUTS = {"contrastive_logits": ("float32", lambda c: ("B", c)),
                            "contrastive_probs": ("float32", lambda c: ("B", c)),
                            "contrastive_pred": ("int64", lambda c: ("B",))}


@dataclass(frozen=True)
class HeadSpec:
    """A second graph run after the probe graph in the same engine call (e.g. the contrastive MLP).

    Its inputs are outputs of the probe graph (or of earlier heads), matched by name, dtype and shape;
    its outputs join the probe outputs under names no one else uses.
    """

    name: str
    file: str
    inputs: tuple             # TensorSpec
    outputs: tuple            # TensorSpec
    fit: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data, path: str) -> "HeadSpec":
        data = _dict(data, path)
        inputs = _list(_get(data, "inputs", path), f"{path}.inputs", TensorSpec.from_json, max_length=16)
        outputs = _list(_get(data, "outputs", path), f"{path}.outputs", TensorSpec.from_json, max_length=64)
        for group, specs in (("inputs", inputs), ("outputs", outputs)):
            names = [spec.name for spec in specs]
            if not names or len(set(names)) != len(names):
                raise _fail(f"{path}.{group}", "at least one tensor, names distinct", names)
        return cls(_name(_get(data, "name", path), f"{path}.name"),
                   check_plain_name(_get(data, "file", path), f"manifest field {path}.file"), inputs, outputs,
                   _json_value(_dict(data.get("fit", {}), f"{path}.fit"), f"{path}.fit"))

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def to_json(self) -> dict:
        return {"name": self.name, "file": self.file, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "fit": self.fit}


def check_heads(heads: tuple, outputs: tuple, files: dict) -> None:
    """Heads in order: distinct names and files, listed files, inputs that exist with the same dtype and
    shape (probe outputs or earlier heads' outputs), outputs under fresh names."""
    available = {spec.name: spec for spec in outputs}
    seen_names, seen_files = set(), set()
    for index, head in enumerate(heads):
        where = f"manifest field heads[{index}]"
        if head.name in seen_names or head.file in seen_files:
            raise BundleError(f"{where}: head names and files must be distinct ({head.name!r}, {head.file!r})")
        seen_names.add(head.name)
        seen_files.add(head.file)
        if head.file not in files:
            raise BundleError(f"{where}.file: {head.file!r} is not listed in files")
        for spec in head.inputs:
            source = available.get(spec.name)
            if source is None or (source.dtype, tuple(source.shape)) != (spec.dtype, tuple(spec.shape)):
                found = "no such output" if source is None else f"{source.dtype} {list(source.shape)}"
                raise BundleError(f"{where}.inputs: {spec.name!r} must be an output of the graph or an earlier head "
                                  f"with dtype {spec.dtype} and shape {list(spec.shape)} ({found})")
        for spec in head.outputs:
            if spec.name in available:
                raise BundleError(f"{where}.outputs: {spec.name!r} is already an output of the graph or a head")
            available[spec.name] = spec


@dataclass(frozen=True)
class ClassifierSection:
    """What the classifier probe graph explains and measures."""

    class_names: tuple
    target_layer: str
    target_shape: tuple       # (K, u, v)
    linear: str
    features: int
    maps: tuple               # MapSpec, in output order
    layer_grads: LayerGrads | None = None
    contrastive: ContrastiveFeatures | None = None

    @classmethod
    def from_json(cls, data, path: str) -> "ClassifierSection":
        data = _dict(data, path)
        names = _list(_get(data, "class_names", path), f"{path}.class_names",
                      lambda v, p: _str(v, p, max_length=200), max_length=100_000)
        if len(set(names)) != len(names):
            raise _fail(f"{path}.class_names", "distinct names", list(names)[:10])
        target = _dict(_get(data, "target_layer", path), f"{path}.target_layer")
        head = _dict(_get(data, "head", path), f"{path}.head")
        maps = _list(_get(data, "maps", path), f"{path}.maps", MapSpec.from_json, max_length=64)
        if len({m.name for m in maps}) != len(maps):
            raise _fail(f"{path}.maps", "distinct map names", [m.name for m in maps])
        layer_grads = data.get("layer_grads")
        contrastive = data.get("contrastive")
        return cls(names, _str(_get(target, "name", f"{path}.target_layer"), f"{path}.target_layer.name", max_length=400),
                   _list(_get(target, "shape", f"{path}.target_layer"), f"{path}.target_layer.shape",
                         lambda v, p: _int(v, p, 1, MAX_DIM), length=3),
                   _str(_get(head, "linear", f"{path}.head"), f"{path}.head.linear", max_length=400),
                   _int(_get(head, "features", f"{path}.head"), f"{path}.head.features", 1, 1 << 24), maps,
                   None if layer_grads is None else LayerGrads.from_json(layer_grads, f"{path}.layer_grads"),
                   None if contrastive is None else ContrastiveFeatures.from_json(contrastive, f"{path}.contrastive"))

    def to_json(self) -> dict:
        return {"class_names": list(self.class_names),
                "target_layer": {"name": self.target_layer, "shape": list(self.target_shape)},
                "head": {"linear": self.linear, "features": self.features},
                "maps": [m.to_json() for m in self.maps],
                "layer_grads": None if self.layer_grads is None else self.layer_grads.to_json(),
                **({"contrastive": self.contrastive.to_json()} if self.contrastive else {})}

    def check_against(self, manifest: "Manifest") -> None:
        """Cross-field checks against the graph's declared inputs and outputs: every output is one this
        section describes, with the dtype and dims it implies (classes, features, map size, taps)."""
        contrast = next((spec for spec in manifest.inputs if spec.name == "contrast"), None)
        if [spec.name for spec in manifest.inputs] != ["images", "contrast"] or contrast.dtype != "int64" or \
                len(contrast.shape) != 1:
            raise BundleError(f"manifest field graph.inputs: a classifier graph takes images [B, C, H, W] float32 and "
                              f"contrast [B] int64, got {[(s.name, s.dtype, list(s.shape)) for s in manifest.inputs]}")
        outputs = {spec.name: (index, spec) for index, spec in enumerate(manifest.outputs)}
        sizes = {"C": (len(self.class_names), "one per classifier.class_names"),
                 "d": (self.features, "classifier.head.features")}
        expected = {}  # output name -> (dtype, dims after the batch, where the dims come from)
        for name, (dtype, dims) in CLASSIFIER_OUTPUTS.items():
            expected[name] = (dtype, tuple(sizes[d][0] if d in sizes else d for d in dims),
                              ", ".join(sizes[d][1] for d in dims if d in sizes) or "fixed")
        for spec in self.maps:
            expected[spec.name] = ("float", self.target_shape[1:], "classifier.maps, classifier.target_layer.shape")
        if self.layer_grads is not None:
            expected["layer_grad_sqnorm"] = ("float", (len(self.layer_grads.names),),
                                             "one per classifier.layer_grads.names")
            for index, tap in enumerate(self.layer_grads.taps):
                expected.update(self._tap_outputs(tap, f"classifier.layer_grads.taps[{index}]", outputs))
        elif "layer_grad_sqnorm" in outputs:
            raise BundleError("manifest field classifier.layer_grads is missing although the graph outputs "
                              "layer_grad_sqnorm: the tap columns could not be completed")
        if self.contrastive is not None:
            expected.update(self.contrastive.expected_outputs(len(self.class_names), self.features))
        for name, (dtype, dims, source) in expected.items():
            if name not in outputs:
                raise BundleError(f"manifest field graph.outputs: the classifier graph must declare {name!r} "
                                  f"({source})")
            index, spec = outputs[name]
            if (spec.dtype not in FLOAT_DTYPES if dtype == "float" else spec.dtype != dtype) or \
                    tuple(spec.shape[1:]) != tuple(dims):
                raise BundleError(f"manifest field graph.outputs[{index}] ({name}): expected {dtype} "
                                  f"[B, {', '.join(map(str, dims))}] ({source}), got {spec.dtype} {list(spec.shape)}")
        unexplained = [name for name in outputs if name not in expected]
        if unexplained:
            raise BundleError(f"manifest field classifier.maps / .layer_grads / .contrastive.variants: graph output(s) "
                              f"{unexplained[:8]} are described by no section; a map, tap or contrastive variant "
                              "is missing")
        self._check_contrastive_head(manifest.heads, len(self.class_names))

    @staticmethod
    def _tap_outputs(tap: "Tap", where: str, outputs: dict) -> dict:
        """The two outputs a tap reads, named after its column, with the shapes its convolution implies."""
        if (tap.input, tap.grad) != (f"tap_input_{tap.column}", f"tap_grad_{tap.column}"):
            raise BundleError(f"manifest field {where}: column {tap.column} reads outputs tap_input_{tap.column} / "
                              f"tap_grad_{tap.column}, got {tap.input!r} / {tap.grad!r}")
        for name in (tap.input, tap.grad):
            if name not in outputs:
                raise BundleError(f"manifest field {where}: {name!r} must be a declared output of the graph")
            index, spec = outputs[name]
            if len(spec.shape) != 4 or not all(isinstance(d, int) for d in spec.shape[1:]):
                raise BundleError(f"manifest field graph.outputs[{index}] ({name}): a tap is a 4-D output "
                                  f"[B, C, H, W] of fixed C, H, W (read by {where}), got {list(spec.shape)}")
        height, width = outputs[tap.input][1].shape[2:]
        conv = tap.conv
        out_h, out_w = conv.output_size(height, width)
        if out_h < 1 or out_w < 1:
            raise BundleError(f"manifest field {where}.conv: {conv} gives an empty output on a {height}x{width} input")
        return {tap.input: ("float", (conv.in_channels, height, width), f"{where}.conv.in_channels"),
                tap.grad: ("float", (conv.out_channels, out_h, out_w), f"{where}.conv")}

    def _check_contrastive_head(self, heads: tuple, classes: int) -> None:
        head = next((head for head in heads if head.name == "contrastive"), None)
        if head is None:
            return
        if self.contrastive is None:
            raise BundleError("manifest field heads: a 'contrastive' head needs classifier.contrastive features")
        features = {ContrastiveFeatures.output_name(variant) for variant in self.contrastive.variants}
        if not set(head.input_names) <= features:
            raise BundleError(f"manifest field heads: the 'contrastive' head must read contrastive features "
                              f"{sorted(features)}, not {head.input_names}")
        declared = {spec.name: spec for spec in head.outputs}
        for name, (dtype, shape) in CONTRASTIVE_HEAD_OUTPUTS.items():
            spec = declared.get(name)
            if spec is None or spec.dtype != dtype or tuple(spec.shape) != shape(classes):
                raise BundleError(f"manifest field heads: the 'contrastive' head must output {name} as {dtype} of "
                                  f"shape {list(shape(classes))}")


GRADCON_OUTPUTS = ("score", "normality", "recon_loss", "cosine")
GRADCON_RULES = ("max_f1", "tpr")


@dataclass(frozen=True)
class GradConSection:
    """A GradCon anomaly detector (METHODS.md §2): the graph computes every score, the bundle holds its threshold.

    ``score`` = recon_loss − β·mean(cosine) is gradprobe's orientation (higher = more anomalous): the
    negated normality score s = −L + β·mean cos of the paper, which the graph also outputs as ``normality``.
    """

    beta: float
    decoder_weights: tuple          # one name per cosine column
    threshold: float | None = None  # score above which an image is anomalous; set by calibrate
    calibration: dict = field(default_factory=dict)   # rule (max_f1 or tpr), sizes, data description
    training: dict = field(default_factory=dict)      # informational: normal class, epochs, alpha, seed ...

    @classmethod
    def from_json(cls, data, path: str) -> "GradConSection":
        data = _dict(data, path)
        threshold = data.get("threshold")
        calibration = _json_value(_dict(data.get("calibration", {}), f"{path}.calibration"), f"{path}.calibration")
        if threshold is not None and calibration.get("rule") not in GRADCON_RULES:
            raise _fail(f"{path}.calibration.rule", f"one of {list(GRADCON_RULES)} for a calibrated threshold",
                        calibration.get("rule"))
        return cls(_float(_get(data, "beta", path), f"{path}.beta", 0.0, 1e6),
                   _list(_get(data, "decoder_weights", path), f"{path}.decoder_weights",
                         lambda v, p: _str(v, p, max_length=200), max_length=64),
                   None if threshold is None else _float(threshold, f"{path}.threshold"), calibration,
                   _json_value(_dict(data.get("training", {}), f"{path}.training"), f"{path}.training"))

    def to_json(self) -> dict:
        return {"beta": self.beta, "decoder_weights": list(self.decoder_weights), "threshold": self.threshold,
                "score": "recon_loss - beta * mean(cosine): higher means more anomalous (the negated GradCon "
                         "normality score s = -L + beta * mean cos, also output as 'normality')",
                "is_anomalous": "score > threshold, or any output not finite",
                "calibration": self.calibration, "training": self.training}

    def check_against(self, manifest: "Manifest") -> None:
        outputs = {spec.name: spec for spec in manifest.outputs}
        if tuple(outputs) != GRADCON_OUTPUTS:
            raise BundleError(f"manifest field graph.outputs: a gradcon graph outputs {list(GRADCON_OUTPUTS)}, "
                              f"got {list(outputs)[:8]}")
        for name in GRADCON_OUTPUTS[:3]:
            if len(outputs[name].shape) != 1 or outputs[name].dtype != "float32":
                raise BundleError(f"manifest field graph.outputs: {name!r} must be float32 [B], one per image")
        if tuple(outputs["cosine"].shape[1:]) != (len(self.decoder_weights),):
            raise BundleError(f"manifest field gradcon.decoder_weights: {len(self.decoder_weights)} names for "
                              f"cosine of shape {list(outputs['cosine'].shape)}; one name per column")
        if [spec.name for spec in manifest.inputs] != ["images"]:
            raise BundleError("manifest field graph.inputs: a gradcon graph takes 'images' only")
        if manifest.detector is not None:
            raise BundleError("manifest field detector: a gradcon bundle keeps its threshold in gradcon.threshold")
        if manifest.heads:
            raise BundleError("manifest field heads: a gradcon bundle runs its graph alone, without heads")


#: Kinds of bundle and the section each one carries (name of the section = name of the kind).
SECTIONS: dict[str, type] = {"classifier": ClassifierSection, "gradcon": GradConSection}


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle says about itself; build with ``from_json`` (validating) or directly (export)."""

    kind: str
    input: InputSpec
    graph: str                      # file name of the ONNX graph
    inputs: tuple                   # TensorSpec
    outputs: tuple                  # TensorSpec
    section: Any                    # the kind's section, e.g. ClassifierSection
    model: ModelInfo
    files: dict                     # name -> FileRecord
    detector: DetectorSection | None = None
    gradprobe_version: str = ""
    created: str = ""
    export: dict = field(default_factory=dict)
    engines: tuple = ()             # EngineRecord: TensorRT engines built from the graph
    heads: tuple = ()               # HeadSpec, run after the graph in this order
    graph_weights: GraphWeights | None = None  # the graph's initializers kept beside it (models over 2 GiB)

    FIELDS: ClassVar = ("format", "schema_version", "kind", "gradprobe_version", "created", "model", "input",
                        "graph", "score_orientation", "files", "detector", "export", "engines", "heads")

    @property
    def classifier(self) -> ClassifierSection:
        if self.kind != "classifier":
            raise BundleError(f"this is a {self.kind!r} bundle, not a classifier bundle")
        return self.section

    @property
    def gradcon(self) -> GradConSection:
        if self.kind != "gradcon":
            raise BundleError(f"this is a {self.kind!r} bundle, not a gradcon bundle")
        return self.section

    def graph_files(self) -> list[str]:
        """The files an engine of the graph reads: the graph, and its weights where they lie apart."""
        return [self.graph] + ([self.graph_weights.file] if self.graph_weights else [])

    def output(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.outputs if spec.name == name), None)

    @classmethod
    def from_json(cls, data) -> "Manifest":
        data = _dict(data, "(top level)")
        if data.get("format") != FORMAT:
            raise BundleError(f"not a gradprobe manifest (expected \"format\": \"{FORMAT}\", "
                              f"got {data.get('format')!r:.60})")
        version = _get(data, "schema_version", "")
        if isinstance(version, bool) or not isinstance(version, int):
            raise _fail("schema_version", "an integer", version)
        if version > SCHEMA_VERSION:
            raise BundleError(f"schema_version {version} is newer than this gradprobe understands "
                              f"({SCHEMA_VERSION}); upgrade gradprobe to load it")
        if version < SCHEMA_VERSION:
            raise BundleError(f"schema_version {version} is older than this gradprobe reads ({SCHEMA_VERSION}); "
                              "re-export the model with this gradprobe")
        unknown = sorted(set(data) - set(cls.FIELDS) - set(SECTIONS))
        if unknown:
            raise BundleError(f"manifest has unknown field(s) {unknown[:5]}; it was written by another tool")
        kind = _str(_get(data, "kind", ""), "kind", tuple(SECTIONS))
        if data.get("score_orientation", SCORE_ORIENTATION) != SCORE_ORIENTATION:
            raise _fail("score_orientation", repr(SCORE_ORIENTATION), data.get("score_orientation"))
        files_data = _dict(_get(data, "files", ""), "files")
        if len(files_data) > 1024:
            raise _fail("files", "at most 1024 files", len(files_data))
        files = {check_plain_name(name, "manifest field files key"): FileRecord.from_json(record, f"files.{name}")
                 for name, record in files_data.items()}
        graph = _dict(_get(data, "graph", ""), "graph")
        graph_file = check_plain_name(_get(graph, "file", "graph"), "manifest field graph.file")
        detector = data.get("detector")
        weights = graph.get("weights")
        manifest = cls(
            kind=kind, input=InputSpec.from_json(_get(data, "input", ""), "input"), graph=graph_file,
            inputs=_list(_get(graph, "inputs", "graph"), "graph.inputs", TensorSpec.from_json, max_length=16),
            outputs=_list(_get(graph, "outputs", "graph"), "graph.outputs", TensorSpec.from_json, max_length=4096),
            section=SECTIONS[kind].from_json(_get(data, kind, ""), kind),
            model=ModelInfo.from_json(_get(data, "model", ""), "model"), files=files,
            detector=None if detector is None else DetectorSection.from_json(detector, "detector"),
            gradprobe_version=_str(data.get("gradprobe_version", ""), "gradprobe_version", max_length=64),
            created=_str(data.get("created", ""), "created", max_length=64),
            export=_json_value(_dict(data.get("export", {}), "export"), "export"),
            engines=_list(data.get("engines", []), "engines", EngineRecord.from_json, max_length=64),
            heads=_list(data.get("heads", []), "heads", HeadSpec.from_json, max_length=16),
            graph_weights=None if weights is None else GraphWeights.from_json(weights, "graph.weights"))
        manifest.check()
        return manifest

    def check(self) -> None:
        """Cross-field consistency: listed files, distinct tensor names, the kind's own checks."""
        for name, what in ((self.graph, "graph.file"), (self.model.weights, "model.weights"),
                           (self.detector.file if self.detector else None, "detector.file")):
            if name is not None and name not in self.files:
                raise BundleError(f"manifest field {what}: {name!r} is not listed in files")
        if not self.outputs:
            raise BundleError("manifest field graph.outputs: a graph must declare its outputs")
        for group, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise BundleError(f"manifest field graph.{group}: names must be distinct, got {names[:20]}")
            for index, spec in enumerate(specs):
                if not spec.shape or not isinstance(spec.shape[0], str):
                    raise BundleError(f"manifest field graph.{group}[{index}].shape ({spec.name}): expected the batch "
                                      f"dimension first, by name (e.g. \"B\"), got {list(spec.shape)}")
        for name, limit, what in ((self.graph, MAX_GRAPH_BYTES, "graph.file"),
                                  (self.detector.file if self.detector else None, MAX_DETECTOR_BYTES, "detector.file")):
            if name is not None and name in self.files and self.files[name].bytes > limit:
                raise BundleError(f"manifest field files.{name}.bytes: {self.files[name].bytes} bytes is more than a "
                                  f"{what} may have ({limit})")
        index = next((i for i, spec in enumerate(self.inputs) if spec.name == "images"), None)
        images = None if index is None else self.inputs[index]
        if images is None or images.dtype != "float32" or tuple(images.shape[1:]) != self.input.shape:
            where = "graph.inputs" if images is None else f"graph.inputs[{index}] (images)"
            raise BundleError(f"manifest field {where}: expected an 'images' float32 input of shape "
                              f"[B, {', '.join(map(str, self.input.shape))}] matching input.shape")
        for index, engine in enumerate(self.engines):
            if engine.file not in self.files:
                raise BundleError(f"manifest field engines[{index}].file: {engine.file!r} is not listed in files")
        if len({e.key for e in self.engines}) != len(self.engines) or \
                len({e.file for e in self.engines}) != len(self.engines):
            raise BundleError("manifest field engines: one engine per (TensorRT, GPU, capability, precision, "
                              "profile) and per file")
        if self.detector is not None:
            source = self.output(self.detector.features)
            if source is None:
                raise BundleError(f"manifest field detector.features: {self.detector.features!r} is not an output "
                                  "of the graph")
            if tuple(source.shape[1:]) != (self.detector.feature_count,):
                raise BundleError(f"manifest field detector.feature_count: {self.detector.feature_count} features, but "
                                  f"detector.features {source.name!r} has shape {list(source.shape)}")
        if self.graph_weights is not None:
            self.graph_weights.check_against(self.files, self.graph)
        check_heads(self.heads, self.outputs, self.files)
        self.section.check_against(self)

    def to_json(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                "gradprobe_version": self.gradprobe_version, "created": self.created,
                "model": self.model.to_json(), "input": self.input.to_json(),
                "graph": {"file": self.graph, "inputs": [s.to_json() for s in self.inputs],
                          "outputs": [s.to_json() for s in self.outputs],
                          **({"weights": self.graph_weights.to_json()} if self.graph_weights else {})},
                self.kind: self.section.to_json(),
                "detector": None if self.detector is None else self.detector.to_json(),
                "score_orientation": SCORE_ORIENTATION,
                "files": {name: record.to_json() for name, record in sorted(self.files.items())},
                "export": _json_value(self.export, "export"),
                **({"engines": [engine.to_json() for engine in self.engines]} if self.engines else {}),
                **({"heads": [head.to_json() for head in self.heads]} if self.heads else {})}
