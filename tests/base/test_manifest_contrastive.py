"""The manifest's contrastive features and heads: a valid one round-trips; every malformed field is named."""
import copy

import pytest

from gradprobe.base.errors import BundleError
from gradprobe.base.manifest import Manifest

from .test_manifest import DELETE, GOLDEN
from .test_manifest import _edit as edit_golden

HEAD_FILE = "head-contrastive-0123456789abcdef.onnx"


def _output(name, dtype, shape, meaning=""):
    return {"name": name, "dtype": dtype, "shape": shape, "meaning": meaning}


def _valid() -> dict:
    """The golden manifest exported with contrastive=("compact", "norms") and a trained contrastive head."""
    data = copy.deepcopy(GOLDEN)
    data["graph"]["outputs"] += [_output("contrastive_compact", "float32", ["B", 10, 128]),
                                 _output("contrastive_norms", "float32", ["B", 10])]
    data["classifier"]["contrastive"] = {"variants": ["compact", "norms"]}
    data["files"][HEAD_FILE] = {"sha256": "0" * 64, "bytes": 1234}
    data["heads"] = [{"name": "contrastive", "file": HEAD_FILE,
                      "inputs": [_output("contrastive_compact", "float32", ["B", 10, 128])],
                      "outputs": [_output("contrastive_logits", "float32", ["B", 10]),
                                  _output("contrastive_probs", "float32", ["B", 10]),
                                  _output("contrastive_pred", "int64", ["B"])],
                      "fit": {"variant": "compact", "seed": 0, "held_out_accuracy": 0.93}}]
    return data


VALID = _valid()
COMPACT, NORMS = len(GOLDEN["graph"]["outputs"]), len(GOLDEN["graph"]["outputs"]) + 1  # their indices in outputs


def _edit(path: str, value):
    """A copy of VALID with the field at ``path`` ("/"-separated keys, integers for list items) set or deleted."""
    return edit_golden(path, value, VALID)


def test_valid_round_trips_exactly():
    manifest = Manifest.from_json(copy.deepcopy(VALID))
    assert manifest.to_json() == VALID
    assert manifest.classifier.contrastive.variants == ("compact", "norms")
    assert [head.name for head in manifest.heads] == ["contrastive"]
    assert manifest.heads[0].output_names == ["contrastive_logits", "contrastive_probs", "contrastive_pred"]


def test_bundles_without_contrastive_parts_write_no_new_keys():
    """Old bundles and other branches' manifests keep their exact JSON: the new keys appear only when used."""
    written = Manifest.from_json(copy.deepcopy(GOLDEN)).to_json()
    assert "heads" not in written and "contrastive" not in written["classifier"]


#: (field, damaged value, words the error must contain)
DAMAGES = [
    ("classifier/contrastive/variants", ["compact", "huge"], "variants[1]: expected one of"),
    ("classifier/contrastive/variants", [], "at least one"),
    ("classifier/contrastive/variants", ["compact", "compact"], "distinct variants"),
    ("classifier/contrastive/variants", "compact", "variants: expected a list"),
    ("classifier/contrastive/variants", ["compact"], "graph outputs contrastive_norms but the variants are"),
    ("classifier/contrastive/variants", ["compact", "norms", "full"], "variant 'full' needs a float32 output"),
    ("classifier/contrastive", [], "classifier.contrastive: expected an object"),
    ("classifier/contrastive", DELETE, "graph outputs contrastive_compact but the variants are []"),
    ("classifier/contrastive", None, "graph outputs contrastive_compact"),
    (f"graph/outputs/{COMPACT}/shape", ["B", 10, 64], "'contrastive_compact' must be an output of the graph or an "
                                                     "earlier head with dtype float32 and shape ['B', 10, 128] "
                                                     "(float32 ['B', 10, 64])"),
    (f"graph/outputs/{NORMS}/dtype", "float64", "variant 'norms' needs a float32 output contrastive_norms of shape "
                                                "['B', 10]"),
    (f"graph/outputs/{NORMS}/shape", ["B", 11], "variant 'norms' needs"),
    ("heads", {}, "heads: expected a list"),
    ("heads", [VALID["heads"][0]] * 17, "heads: expected a list of at most 16 items"),
    ("heads", [VALID["heads"][0]] * 2, "head names and files must be distinct"),
    ("heads/0/name", "not a name", "heads[0].name"),
    ("heads/0/name", DELETE, "heads[0].name is missing"),
    ("heads/0/file", "../head.onnx", "not a plain file name"),
    ("heads/0/file", "/etc/passwd", "not a plain file name"),
    ("heads/0/file", "head-unlisted.onnx", "heads[0].file: 'head-unlisted.onnx' is not listed in files"),
    ("heads/0/inputs", [], "heads[0].inputs: expected at least one tensor"),
    ("heads/0/inputs/0/name", "contrastive_full", "must be an output of the graph or an earlier head"),
    ("heads/0/inputs/0/shape", ["B", 1280], "with dtype float32 and shape ['B', 1280] (float32 ['B', 10, 128])"),
    ("heads/0/inputs/0/dtype", "int64", "with dtype int64"),
    ("heads/0/inputs", [_output("probs", "float32", ["B", 10])], "the 'contrastive' head must read contrastive "
                                                                  "features ['contrastive_compact', "
                                                                  "'contrastive_norms'], not ['probs']"),
    ("heads/0/outputs", [], "heads[0].outputs: expected at least one tensor"),
    ("heads/0/outputs/0/name", "logits", "'logits' is already an output of the graph or a head"),
    ("heads/0/outputs/1/name", "contrastive_logits", "heads[0].outputs: expected at least one tensor, names distinct"),
    ("heads/0/outputs/0/shape", ["B", 9], "must output contrastive_logits as float32 of shape ['B', 10]"),
    ("heads/0/outputs/2/dtype", "float32", "must output contrastive_pred as int64"),
    ("heads/0/outputs/2/name", "contrastive_decision", "must output contrastive_pred"),
    ("heads/0/outputs/0/dtype", "float16", "heads[0].outputs[0].dtype"),
    ("heads/0/fit", [], "heads[0].fit: expected an object"),
    ("heads/0/fit", {"accuracy": float("nan")}, None),  # non-finite informational numbers become strings
    ("heads/0", "contrastive", "heads[0]: expected an object"),
]


@pytest.mark.parametrize(("field", "value", "words"), DAMAGES, ids=[f"{f}={str(v)[:20]}" for f, v, _ in DAMAGES])
def test_every_malformed_field_is_named(field, value, words):
    if words is None:
        assert Manifest.from_json(_edit(field, value)).heads[0].fit == {"accuracy": "nan"}
        return
    with pytest.raises(BundleError) as caught:
        Manifest.from_json(_edit(field, value))
    assert words in str(caught.value), str(caught.value)


def test_a_contrastive_head_needs_contrastive_features():
    data = _edit("classifier/contrastive", DELETE)
    data["graph"]["outputs"] = data["graph"]["outputs"][:COMPACT]
    data["heads"][0]["inputs"] = [_output("probs", "float32", ["B", 10])]
    with pytest.raises(BundleError, match="a 'contrastive' head needs classifier.contrastive features"):
        Manifest.from_json(data)


def test_a_head_may_read_an_earlier_heads_output():
    data = copy.deepcopy(VALID)
    second = {"name": "calibrated", "file": "head-calibrated.onnx",
              "inputs": [_output("contrastive_logits", "float32", ["B", 10])],
              "outputs": [_output("calibrated_probs", "float32", ["B", 10])]}
    data["heads"].append(second)
    data["files"]["head-calibrated.onnx"] = {"sha256": "1" * 64, "bytes": 10}
    assert [head.name for head in Manifest.from_json(copy.deepcopy(data)).heads] == ["contrastive", "calibrated"]
    data["heads"].reverse()  # now it reads an output no earlier graph produced
    with pytest.raises(BundleError, match=r"heads\[0\].inputs: 'contrastive_logits' must be an output"):
        Manifest.from_json(data)
