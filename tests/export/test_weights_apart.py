"""A model over 2 GiB keeps the graph's weights in a file beside it (one protobuf holds at most 2 GiB). The same
path is checked here on a small model with the threshold lowered: same outputs, and the weights file is as
untrusted as every other file of a bundle."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradprobe  # noqa: E402
from gradprobe.base.errors import BundleError, ExportError  # noqa: E402
from gradprobe.export import pipeline  # noqa: E402
from gradprobe.export.weights_apart import GRAPH_WEIGHTS_FILE  # noqa: E402

from ..bundles import copy_bundle, edit_manifest  # noqa: E402
from ..reference_models import make_model  # noqa: E402


@pytest.fixture(scope="module")
def whole_and_apart(tmp_path_factory, fmnist_test):
    """The same model exported whole and with its weights apart."""
    model = make_model("resnet-tiny")
    example = fmnist_test[0][:4]
    folder = tmp_path_factory.mktemp("apart")
    whole = gradprobe.export(model, example, folder / "whole", layer_grads=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "WEIGHTS_APART_ABOVE", 0)
        apart = gradprobe.export(model, example, folder / "apart", layer_grads=True)
    return whole, apart


def test_weights_lie_apart_and_every_output_matches(whole_and_apart, fmnist_test):
    whole, apart = whole_and_apart
    manifest = gradprobe.load(apart).manifest
    weights = manifest.graph_weights
    assert weights is not None and weights.file == GRAPH_WEIGHTS_FILE
    moved = sum(tensor.nbytes for tensor in weights.tensors)
    assert moved > 0.9 * manifest.files[GRAPH_WEIGHTS_FILE].bytes  # little padding
    whole_graph = gradprobe.load(whole).manifest.files[manifest.graph].bytes
    assert whole_graph - manifest.files[manifest.graph].bytes > 0.99 * moved  # the graph no longer holds them
    images = fmnist_test[0][:16]
    contrast = np.arange(16) % 11 - 1
    expected, got = gradprobe.load(whole).run(images, contrast), gradprobe.load(apart).run(images, contrast)
    for name in expected.outputs:
        np.testing.assert_allclose(got.outputs[name], expected.outputs[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_modified_weights_file_is_refused(whole_and_apart, tmp_path):
    bundle = copy_bundle(whole_and_apart[1], tmp_path)
    data = bytearray((bundle / GRAPH_WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / GRAPH_WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        gradprobe.load(bundle)


@pytest.mark.parametrize("field, value, message", [
    ("offset", 1 << 30, "beyond the end"),
    ("offset", 3, "multiple of 64"),
    ("dtype", "object", "one of"),
    ("shape", [-1], "integer in"),
    ("name", "", "non-empty"),
])
def test_a_damaged_tensor_record_is_refused(whole_and_apart, tmp_path, field, value, message):
    bundle = copy_bundle(whole_and_apart[1], tmp_path)
    edit_manifest(bundle, lambda m: m["graph"]["weights"]["tensors"][0].update({field: value}))
    with pytest.raises(BundleError, match=message):
        gradprobe.load(bundle)


def test_a_tensor_of_another_shape_is_refused_by_the_engine(whole_and_apart, tmp_path):
    bundle = copy_bundle(whole_and_apart[1], tmp_path)
    edit_manifest(bundle, lambda m: m["graph"]["weights"]["tensors"][0].update(shape=[1]))
    with pytest.raises(BundleError, match="cannot load the graph"):
        gradprobe.load(bundle)


def test_a_graph_reference_the_manifest_does_not_list_is_never_followed(whole_and_apart, tmp_path, monkeypatch):
    """The graph names its weights file; ONNX Runtime reads a tensor that nobody hands over from that path
    relative to the working directory (here the bundle, where the file lies): the runtime hands over only
    what the manifest lists, from checked bytes, and points ONNX Runtime at an empty folder for the rest."""
    bundle = copy_bundle(whole_and_apart[1], tmp_path)
    edit_manifest(bundle, lambda m: m["graph"]["weights"]["tensors"].pop(0))
    monkeypatch.chdir(bundle)
    with pytest.raises(BundleError, match="cannot load the graph.*does not exist"):
        gradprobe.load(bundle)


def test_weights_file_must_be_a_listed_file_apart_from_the_graph(whole_and_apart, tmp_path):
    bundle = copy_bundle(whole_and_apart[1], tmp_path)
    edit_manifest(bundle, lambda m: m["graph"]["weights"].update(file=m["graph"]["file"]))
    with pytest.raises(BundleError, match="apart from the graph"):
        gradprobe.load(bundle)
    edit_manifest(bundle, lambda m: m["graph"]["weights"].update(file="../probe.weights"))
    with pytest.raises(BundleError, match="plain file name"):
        gradprobe.load(bundle)


def test_tensorrt_build_says_it_does_not_take_such_bundles(whole_and_apart):
    from gradprobe.export.tensorrt_build import build_engine

    with pytest.raises(ExportError, match="not supported yet"):
        build_engine(whole_and_apart[1])


def test_info_says_where_the_weights_are(whole_and_apart, capsys):
    from gradprobe.cli import main

    assert main(["info", str(whole_and_apart[1])]) == 0
    assert f"beside the graph in {GRAPH_WEIGHTS_FILE}" in capsys.readouterr().out
