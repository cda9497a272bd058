"""Bad input gets a gradprobe exception that names the problem and the expected value; never a crash."""
import json
import shutil

import numpy as np
import onnx
import pytest

import gradprobe
from gradprobe.errors import BundleError, GradprobeError, InputError


@pytest.fixture(scope="module")
def bundle(exported):
    return exported("resnet18-quarter")[1]


@pytest.fixture(scope="module")
def probe(bundle):
    return gradprobe.load(bundle)


GOOD = np.zeros((2, 1, 28, 28), np.float32)


@pytest.mark.parametrize("images, fragment", [
    (GOOD[0], "rank 4"),
    (np.zeros((2, 3, 28, 28), np.float32), "1 channel"),
    (np.zeros((2, 1, 32, 32), np.float32), "28x28 pixels"),
    (GOOD.astype(np.float64), "dtype float32"),
    (GOOD.astype(np.uint8), "dtype float32"),
    (np.zeros((0, 1, 28, 28), np.float32), "empty batch"),
    (GOOD.tolist(), "numpy.ndarray"),
    ("image.png", "numpy.ndarray"),
])
def test_bad_images(probe, images, fragment):
    with pytest.raises(InputError, match=fragment) as info:
        probe.run(images)
    assert isinstance(info.value, ValueError) and isinstance(info.value, GradprobeError)
    assert "[B, 1, 28, 28]" in str(info.value) or fragment in ("dtype float32", "empty batch")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_images(probe, value):
    images = GOOD.copy()
    images[1, 0, 3, 4] = value
    with pytest.raises(InputError, match="NaN or Inf.*batch index 1"):
        probe.run(images)


@pytest.mark.parametrize("contrast, fragment", [
    (10, "out of range.*0..9"),
    (-2, "out of range"),
    ([0, 1, 2], "length 2"),
    (np.zeros((2, 1), np.int64), "length 2"),
    (0.5, "integer class indices"),
    ("Giraffe", "unknown class name"),
])
def test_bad_contrast(probe, contrast, fragment):
    with pytest.raises(InputError, match=fragment):
        probe.run(GOOD, contrast)


def test_contrast_by_name_and_broadcast(probe):
    by_name = probe.run(GOOD, "Coat")
    assert by_name.contrast_class.tolist() == [4, 4]
    assert probe.run(GOOD, [4, 4]).contrast_class.tolist() == [4, 4]


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_truncated_onnx(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    data = (copy / "probe.onnx").read_bytes()
    (copy / "probe.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        gradprobe.load(copy)


def test_missing_file(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "probe.onnx").unlink()
    with pytest.raises(BundleError, match="missing probe.onnx"):
        gradprobe.load(copy)


def test_missing_manifest(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        gradprobe.load(copy)


def test_corrupt_manifest(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        gradprobe.load(copy)


def _foreign_onnx(path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_foreign_onnx_file_passed_directly(tmp_path):
    _foreign_onnx(tmp_path / "model.onnx")
    with pytest.raises(BundleError, match="ONNX file, not a gradprobe bundle"):
        gradprobe.load(tmp_path / "model.onnx")


def test_foreign_onnx_inside_bundle(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    _foreign_onnx(copy / "probe.onnx")
    with pytest.raises(BundleError, match="sha256|bytes"):
        gradprobe.load(copy)


def test_foreign_onnx_with_forged_manifest(bundle, tmp_path):
    from gradprobe.bundle import file_record

    copy = _copy(bundle, tmp_path)
    _foreign_onnx(copy / "probe.onnx")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["probe.onnx"] = file_record(copy / "probe.onnx")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not the probe graph its manifest describes"):
        gradprobe.load(copy)


def test_newer_schema(bundle, tmp_path):
    copy = _copy(bundle, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99.*upgrade gradprobe"):
        gradprobe.load(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        gradprobe.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="no manifest.json"):
        gradprobe.load(tmp_path)


def test_unknown_provider(bundle):
    with pytest.raises(gradprobe.BackendUnavailableError, match=r"gradprobe\[gpu\]"):
        gradprobe.load(bundle, providers=["CUDAExecutionProvider"])
