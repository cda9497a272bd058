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
MAX_DIM = 1 << 16
MAX_ITEMS = 1 << 16
DTYPES = ("float32", "float64", "int64")

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
    if pattern is not None and not pattern.match(value):
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
    """Free-form informational data (descriptions, export notes): plain JSON, bounded depth."""
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
                "config": self.config}


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


CONFOUNDING_LOSSES = ("bce", "softmax")
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
        return cls(_name(_get(data, "kind", path), f"{path}.kind"),
                   check_plain_name(_get(data, "file", path), f"manifest field {path}.file"),
                   _name(_get(data, "features", path), f"{path}.features"),
                   _int(_get(data, "feature_count", path), f"{path}.feature_count", 1, MAX_ITEMS),
                   _float(_get(data, "threshold", path), f"{path}.threshold"),
                   _float(_get(data, "tpr", path), f"{path}.tpr", 0.5, 1.0),
                   _json_value(_dict(data.get("fit", {}), f"{path}.fit"), f"{path}.fit"))

    def to_json(self) -> dict:
        return {"kind": self.kind, "file": self.file, "features": self.features, "feature_count": self.feature_count,
                "threshold": self.threshold, "tpr": self.tpr, "score_orientation": SCORE_ORIENTATION,
                "is_anomalous": "score > threshold, or any output not finite", "fit": self.fit}


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
        return cls(names, _str(_get(target, "name", f"{path}.target_layer"), f"{path}.target_layer.name", max_length=400),
                   _list(_get(target, "shape", f"{path}.target_layer"), f"{path}.target_layer.shape",
                         lambda v, p: _int(v, p, 1, MAX_DIM), length=3),
                   _str(_get(head, "linear", f"{path}.head"), f"{path}.head.linear", max_length=400),
                   _int(_get(head, "features", f"{path}.head"), f"{path}.head.features", 1, 1 << 24), maps,
                   None if layer_grads is None else LayerGrads.from_json(layer_grads, f"{path}.layer_grads"))

    def to_json(self) -> dict:
        return {"class_names": list(self.class_names),
                "target_layer": {"name": self.target_layer, "shape": list(self.target_shape)},
                "head": {"linear": self.linear, "features": self.features},
                "maps": [m.to_json() for m in self.maps],
                "layer_grads": None if self.layer_grads is None else self.layer_grads.to_json()}

    def check_against(self, manifest: "Manifest") -> None:
        """Cross-field checks against the graph's declared outputs."""
        outputs = {spec.name: spec for spec in manifest.outputs}
        for required in ("logits", "probs", "pred", "features", "contrast_class"):
            if required not in outputs:
                raise BundleError(f"manifest field outputs: the classifier graph must declare {required!r}")
        classes = outputs["logits"].shape[-1]
        if classes != len(self.class_names):
            raise BundleError(f"manifest field classifier.class_names: expected {classes} names, one per logit "
                              f"(outputs.logits has shape {list(outputs['logits'].shape)}), got {len(self.class_names)}")
        for spec in self.maps:
            declared = outputs.get(spec.name)
            if declared is None or tuple(declared.shape[1:]) != self.target_shape[1:]:
                raise BundleError(f"manifest field classifier.maps: map {spec.name!r} must be a declared output of "
                                  f"shape [B, {self.target_shape[1]}, {self.target_shape[2]}]")
        if self.layer_grads is not None:
            norms = outputs.get("layer_grad_sqnorm")
            if norms is None or norms.shape[-1] != len(self.layer_grads.names):
                raise BundleError("manifest field classifier.layer_grads: the graph must declare layer_grad_sqnorm "
                                  f"with {len(self.layer_grads.names)} columns, one per parameter name")
            for tap in self.layer_grads.taps:
                for name in (tap.input, tap.grad):
                    if name not in outputs or len(outputs[name].shape) != 4:
                        raise BundleError(f"manifest field classifier.layer_grads.taps: {name!r} must be a declared "
                                          "4-D output of the graph")
        elif "layer_grad_sqnorm" in outputs:
            raise BundleError("manifest field classifier.layer_grads is missing although the graph outputs "
                              "layer_grad_sqnorm: the tap columns could not be completed")


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

    FIELDS: ClassVar = ("format", "schema_version", "kind", "gradprobe_version", "created", "model", "input",
                        "graph", "score_orientation", "files", "detector", "export")

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
        manifest = cls(
            kind=kind, input=InputSpec.from_json(_get(data, "input", ""), "input"), graph=graph_file,
            inputs=_list(_get(graph, "inputs", "graph"), "graph.inputs", TensorSpec.from_json, max_length=16),
            outputs=_list(_get(graph, "outputs", "graph"), "graph.outputs", TensorSpec.from_json, max_length=4096),
            section=SECTIONS[kind].from_json(_get(data, kind, ""), kind),
            model=ModelInfo.from_json(_get(data, "model", ""), "model"), files=files,
            detector=None if detector is None else DetectorSection.from_json(detector, "detector"),
            gradprobe_version=_str(data.get("gradprobe_version", ""), "gradprobe_version", max_length=64),
            created=_str(data.get("created", ""), "created", max_length=64),
            export=_json_value(_dict(data.get("export", {}), "export"), "export"))
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
        images = next((spec for spec in self.inputs if spec.name == "images"), None)
        if images is None or images.dtype != "float32" or tuple(images.shape[1:]) != self.input.shape:
            raise BundleError(f"manifest field graph.inputs: expected an 'images' float32 input of shape "
                              f"[B, {', '.join(map(str, self.input.shape))}] matching input.shape")
        if self.detector is not None and self.detector.features not in {spec.name for spec in self.outputs}:
            raise BundleError(f"manifest field detector.features: {self.detector.features!r} is not an output "
                              "of the graph")
        self.section.check_against(self)

    def to_json(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                "gradprobe_version": self.gradprobe_version, "created": self.created,
                "model": self.model.to_json(), "input": self.input.to_json(),
                "graph": {"file": self.graph, "inputs": [s.to_json() for s in self.inputs],
                          "outputs": [s.to_json() for s in self.outputs]},
                self.kind: self.section.to_json(),
                "detector": None if self.detector is None else self.detector.to_json(),
                "score_orientation": SCORE_ORIENTATION,
                "files": {name: record.to_json() for name, record in sorted(self.files.items())},
                "export": self.export}
