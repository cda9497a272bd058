"""Loading damaged or foreign bundles gives a BundleError that says what is wrong; never another exception."""

import numpy as np
import pytest

import gradprobe
from gradprobe import BundleError
from gradprobe.base.bundle import file_record
from tests.bundles import copy_bundle, edit_manifest


def test_truncated_onnx(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    data = (copy / "probe.onnx").read_bytes()
    (copy / "probe.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        gradprobe.load(copy)


def test_missing_file(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    (copy / "probe.onnx").unlink()
    with pytest.raises(BundleError, match="missing probe.onnx"):
        gradprobe.load(copy)


def test_missing_or_corrupt_manifest(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        gradprobe.load(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        gradprobe.load(copy)


def _foreign_onnx(path):
    onnx = pytest.importorskip("onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_foreign_onnx_file_passed_directly(tmp_path):
    _foreign_onnx(tmp_path / "model.onnx")
    with pytest.raises(BundleError, match="ONNX file, not a gradprobe bundle"):
        gradprobe.load(tmp_path / "model.onnx")


def test_foreign_onnx_inside_bundle(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    _foreign_onnx(copy / "probe.onnx")
    with pytest.raises(BundleError, match="sha256|bytes"):
        gradprobe.load(copy)


def test_foreign_onnx_with_forged_manifest(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    _foreign_onnx(copy / "probe.onnx")
    record = file_record((copy / "probe.onnx").read_bytes()).to_json()
    edit_manifest(copy, lambda m: m["files"].update({"probe.onnx": record}))
    with pytest.raises(BundleError, match="not the one its manifest describes"):
        gradprobe.load(copy)


def test_newer_schema(bundles, tmp_path):
    copy = copy_bundle(bundles["plain"], tmp_path)
    edit_manifest(copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99.*upgrade gradprobe"):
        gradprobe.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        gradprobe.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no manifest.json"):
        gradprobe.load(tmp_path)


def test_unknown_provider_and_backend(bundles):
    with pytest.raises(gradprobe.BackendUnavailableError, match=r"gradprobe\[gpu\]"):
        gradprobe.load(bundles["plain"], providers=["CUDAExecutionProvider"])
    with pytest.raises(gradprobe.BackendUnavailableError, match="unknown backend 'warp-drive'"):
        gradprobe.load(bundles["plain"], backend="warp-drive")


def test_a_probe_is_a_verified_snapshot(bundles, tmp_path, fmnist_test):
    """The graph is read once and checked: replacing the file after load changes nothing the probe runs."""
    copy = copy_bundle(bundles["plain"], tmp_path)
    probe = gradprobe.load(copy)
    before = probe.run(fmnist_test[0][:2]).logits
    (copy / "probe.onnx").write_bytes(b"garbage")
    np.testing.assert_array_equal(probe.run(fmnist_test[0][:2]).logits, before)
