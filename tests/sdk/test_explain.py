"""``Probe.explain`` (shapes, one engine call for several Q, bad contrast) and ``gradprobe explain`` PNGs."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

import gradprobe
from gradprobe.explain import Explanation, add_explain_command, read_input


@pytest.fixture(scope="module")
def probe(bundles):
    return gradprobe.load(bundles["plain"])


@pytest.fixture(scope="module")
def images(fmnist_test):
    return fmnist_test[0][:6]


def _counting(probe, monkeypatch):
    calls = []
    run = probe.run

    def counted(images, contrast=None):
        calls.append((len(images), np.asarray(contrast).copy()))
        return run(images, contrast)

    monkeypatch.setattr(probe, "run", counted)
    return calls


def test_shapes_ranges_and_one_call(probe, images, monkeypatch):
    calls = _counting(probe, monkeypatch)
    explanation = probe.explain(images)
    assert isinstance(explanation, Explanation) and len(explanation) == 6 and not explanation.several
    assert list(explanation.maps) == list(probe.map_names) == ["cam", "contrastive_cam", "counterfactual_cam",
                                                                 "gradcam_pp"]
    for kind in explanation.maps:
        maps = getattr(explanation, kind)
        assert maps.shape == (6, 28, 28) and maps.dtype == np.float32
        assert maps.min() >= 0 and maps.max() <= 1
    raw = probe.run(images)
    assert len(calls) == 2 and calls[0][0] == 6
    assert (explanation.pred == raw.pred).all() and (explanation.contrast == raw.contrast_class).all()
    assert explanation.probs.shape == (6, 10) and explanation.pred_names == raw.pred_names
    assert np.isclose(explanation.cam.reshape(6, -1).max(1), 1, atol=1e-5).all()  # min-max per map


def test_several_contrast_classes_is_one_call_and_equals_separate_calls(probe, images, monkeypatch):
    several = [[0, 3, -1], [5, 9, 1], [2, 2, 7], ["Bag", 4, 0], [1, 6, 8], [9, 0, 3]]
    calls = _counting(probe, monkeypatch)
    explanation = probe.explain(images, several)
    assert len(calls) == 1 and calls[0][0] == 18  # tiled 3 times, one contrast column per tile
    assert explanation.several and explanation.contrastive_cam.shape == (6, 3, 28, 28)
    assert explanation.contrast.shape == (6, 3) and explanation.contrast[3, 0] == probe.class_names.index("Bag")
    for k in range(3):
        single = probe.explain(images, [row[k] for row in several])
        assert np.array_equal(single.contrastive_cam, explanation.contrastive_cam[:, k])
        assert np.array_equal(single.cam, explanation.cam)
        assert np.array_equal(single.contrast, explanation.contrast[:, k])
    as_array = probe.explain(images, np.array([[0, 3]] * 6))
    assert np.array_equal(as_array.contrastive_cam[:, 1], probe.explain(images, 3).contrastive_cam)


def test_one_class_for_all_by_index_or_name(probe, images):
    by_index = probe.explain(images, 4)
    by_name = probe.explain(images, "Coat")
    assert (by_index.contrast == 4).all() and np.array_equal(by_index.contrastive_cam, by_name.contrastive_cam)


@pytest.mark.parametrize("contrast, message", [
    (10, "out of range"), (-2, "out of range"), ("Cat", "unknown contrast class name"), (2.5, "index or name"),
    ([1, 2], "one per image"), ([[1, 2], [3]] + [[0, 1]] * 4, "same length"), ([[1]] * 5, "6 rows"),
    ([[1, 2.5]] * 6, "index or name"), ([[1, 11]] * 6, "out of range"), ([[True]] * 6, "index or name"),
    (np.uint64(2**64 - 1), "out of range"), ([[2**63, 1]] * 6, "out of range"),
])
def test_bad_contrast_raises_input_error(probe, images, contrast, message):
    with pytest.raises(gradprobe.InputError, match=message):
        probe.explain(images, contrast)


def test_several_classes_for_one_image_need_a_list_per_image(probe, images):
    with pytest.raises(gradprobe.InputError, match=r"one list per image"):
        probe.explain(images[:1], [1, 2, 3])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="gradprobe")
    add_explain_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


def test_cli_writes_png_grids_from_a_png_and_a_npy(probe, images, tmp_path, capsys):
    from PIL import Image

    rgb = np.repeat((images[0, 0] * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    Image.fromarray(rgb).resize((56, 56)).save(tmp_path / "boot.png")  # RGB, twice the size: converted + resized
    np.save(tmp_path / "batch.npy", images[:3])
    out = tmp_path / "out"
    _cli(["explain", str(tmp_path / "boot.png"), str(tmp_path / "batch.npy"), "--bundle", str(probe.path),
          "--contrast", "Sneaker", "5", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["batch.png", "boot.png"]
    for name in ("batch.png", "boot.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 500  # 5 columns: input, cam, 2 contrastive, cf
    assert "wrote" in capsys.readouterr().out


def test_cli_pages_a_large_npy_and_rejects_other_files(probe, images, tmp_path):
    np.save(tmp_path / "batch.npy", (images[:5] * 255).astype(np.uint8))  # uint8 pixels are scaled to [0, 1]
    _cli(["explain", str(tmp_path / "batch.npy"), "--bundle", str(probe.path), "--out", str(tmp_path), "--rows", "2"])
    assert sorted(p.name for p in tmp_path.glob("batch-*.png")) == ["batch-00000.png", "batch-00002.png",
                                                                    "batch-00004.png"]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(gradprobe.InputError, match="expected a .png"):
        _cli(["explain", str(tmp_path / "notes.txt"), "--bundle", str(probe.path), "--out", str(tmp_path)])


def test_read_input_resizes_and_converts_to_the_bundle_shape(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "white.jpg")
    image = read_input(tmp_path / "white.jpg", (1, 28, 28))
    assert image.shape == (1, 1, 28, 28) and image.dtype == np.float32 and np.allclose(image, 1, atol=2 / 255)
    np.save(tmp_path / "float64.npy", np.zeros((1, 1, 28, 28)))
    with pytest.raises(gradprobe.InputError, match="float32"):
        read_input(tmp_path / "float64.npy", (1, 28, 28))
