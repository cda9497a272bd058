"""The typed manifest: a real one round-trips exactly; every malformed field is a BundleError naming it."""
import copy
import json
from pathlib import Path

import pytest

from gradprobe.base.errors import BundleError
from gradprobe.base.manifest import Manifest
from tests.base.test_damaged_bundles import DELETE, set_field

GOLDEN = json.loads((Path(__file__).parent / "data" / "manifest-deep.json").read_text())


def _edit(path: str, value, base: dict | None = None):
    """A copy of the golden manifest (or ``base``) with the field at ``path`` (keys split by "/", or "." when there
    is no "/"; [i] for list items) set to ``value`` (or deleted)."""
    data = copy.deepcopy(GOLDEN if base is None else base)
    parts = path.replace("[", "/" if "/" in path else ".").replace("]", "").split("/" if "/" in path else ".")
    set_field(data, tuple(int(k) if k.isdigit() else k for k in parts), value)
    return data


#: (field, damaged value, words the error must contain)
DAMAGES = [
    ("format", "onnx", "not a gradprobe manifest"),
    ("schema_version", "2", "schema_version: expected an integer, got '2'"),
    ("schema_version", True, "schema_version: expected an integer"),
    ("schema_version", 3, "newer than this gradprobe"),
    ("schema_version", -5, "older than this gradprobe"),
    ("kind", "gradcon-v9", "kind: expected one of"),
    ("kind", DELETE, "kind is missing"),
    ("surprise", 1, "unknown field"),
    ("files/probe.onnx/bytes", "2908654", "files.probe.onnx.bytes: expected an integer"),
    ("files/probe.onnx/bytes", -1, "files.probe.onnx.bytes"),
    ("files/probe.onnx/sha256", "abc", "files.probe.onnx.sha256"),
    ("files", {"../../etc/passwd": GOLDEN["files"]["probe.onnx"]}, "not a plain file name"),
    ("files", {"/etc/passwd": GOLDEN["files"]["probe.onnx"]}, "not a plain file name"),
    ("files", [], "files: expected an object"),
    ("graph.file", "../probe.onnx", "not a plain file name"),
    ("graph.file", "other.onnx", "not listed in files"),
    ("graph.outputs", [], "must declare its outputs"),
    ("graph.outputs[0].name", "cam", "names must be distinct"),
    ("graph.outputs[0].shape", ["B", 11], "graph.outputs[0] (logits): expected float [B, 10] (one per classifier.class_names)"),
    ("graph.outputs[0].dtype", "float16", "graph.outputs[0].dtype"),
    ("graph.outputs[1].shape", ["B", 1 << 30], "graph.outputs[1].shape[1]"),
    ("graph.inputs[0].shape", ["B", 3, 28, 28], "matching input.shape"),
    ("input.shape", [None, 1, 28], "input.shape: expected [null, C, H, W]"),
    ("input.shape", [None, 1, 28, 1 << 20], "input.shape[3]"),
    ("input.range", [1.0, 0.0], "low < high"),
    ("input.range", [0.0, "Infinity"], "input.range[1]: expected a finite number"),
    ("input.normalize.std", [0.0], "input.normalize.std[0]"),
    ("input.normalize.mean", [0.1, 0.2], "a list of 1 items"),
    ("classifier.class_names", [f"c{i}" for i in range(11)], "[B, 11] (one per classifier.class_names), got float32 ['B', 10]"),
    ("classifier.class_names", ["same"] * 10, "distinct names"),
    ("classifier.class_names", DELETE, "classifier.class_names is missing"),
    ("classifier.maps[0].sign", 2, "sign: expected 1 or -1"),
    ("classifier.maps[0].uses_contrast", "no", "uses_contrast"),
    ("classifier.maps[0].name", "not_an_output", "must declare 'not_an_output' (classifier.maps"),
    ("classifier.layer_grads", None, "layer_grads is missing although the graph outputs layer_grad_sqnorm"),
    ("classifier.layer_grads.names", ["only one"], "a list of 1 items"),
    ("classifier.layer_grads.taps", [], "taps for exactly the 'tap' columns"),
    ("classifier.layer_grads.taps[0].conv.padding", [298, 298], "padding[0]: expected an integer in [0, 64]"),
    ("classifier.layer_grads.taps[0].conv.groups", 0, "groups"),
    ("classifier.layer_grads.taps[0].conv.groups", 3, "a divisor of in_channels and out_channels"),
    ("classifier.layer_grads.taps[0].input", "nowhere", "taps[0]: column 0 reads outputs tap_input_0 / tap_grad_0, got 'nowhere'"),
    ("classifier.layer_grads.confounding", "mse", "confounding"),
    ("detector.file", "../../victim/victim.txt", "not a plain file name"),
    ("detector.file", "/dev/zero", "not a plain file name"),
    ("detector.file", "detector-unlisted.npz", "not listed in files"),
    ("detector.threshold", "NaN", "detector.threshold: expected a finite number"),
    ("detector.threshold", None, "detector.threshold"),
    ("detector.tpr", 1.5, "detector.tpr"),
    ("detector.feature_count", 0, "detector.feature_count"),
    ("detector.features", "cam_of_nothing", "detector.features: expected one of"),
    ("model.weights", "../model.safetensors", "not a plain file name"),
    ("model.parameters", 1.5, "model.parameters"),
    ("score_orientation", "lower means more anomalous", "score_orientation"),
    ("export", {"deep": [[[[[[[[[[1]]]]]]]]]]}, "nested at most 8 levels"),
]


def test_golden_round_trips_exactly():
    manifest = Manifest.from_json(copy.deepcopy(GOLDEN))
    assert manifest.to_json() == GOLDEN
    assert manifest.classifier.layer_grads.taps[0].conv.kernel == (3, 3)
    assert len(manifest.classifier.layer_grads.names) == 62 and manifest.detector.kind == "ood-free"


@pytest.mark.parametrize(("field", "value", "words"), DAMAGES, ids=[f"{f}={str(v)[:20]}" for f, v, _ in DAMAGES])
def test_every_malformed_field_is_named(field, value, words):
    with pytest.raises(BundleError) as caught:
        Manifest.from_json(_edit(field, value))
    assert words in str(caught.value), str(caught.value)


def test_non_object_manifests():
    for value in ([], "x", 3, None):
        with pytest.raises(BundleError, match="expected an object"):
            Manifest.from_json(value)
