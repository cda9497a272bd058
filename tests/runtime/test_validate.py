"""Bad images and classes get an InputError that names the problem and the expected value; never a crash."""
import numpy as np
import pytest

import gradprobe
from gradprobe import GradprobeError, InputError
from gradprobe.runtime import contrast_matrix, validate_contrast, validate_images

GOOD = np.zeros((2, 1, 28, 28), np.float32)
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@pytest.fixture(scope="module")
def probe(bundles):
    return gradprobe.load(bundles["plain"])


@pytest.mark.parametrize("images, problem, expected", [
    (GOOD[0], "rank 4", "[B, 1, 28, 28]"),
    (np.zeros((2, 3, 28, 28), np.float32), "1 channel", "got 3"),
    (np.zeros((2, 1, 32, 32), np.float32), "28x28 pixels", "got 32x32"),
    (GOOD.astype(np.float64), "dtype float32", "got float64"),
    (GOOD.astype(np.uint8), "dtype float32", "/ 255 for uint8 pixels"),
    (np.zeros((0, 1, 28, 28), np.float32), "empty batch", "pass at least one image"),
    (GOOD.tolist(), "numpy.ndarray", "got list"),
    ("image.png", "numpy.ndarray", "got str"),
])
def test_bad_images(images, problem, expected):
    """Each message names the problem and what was expected or found."""
    with pytest.raises(InputError, match=problem) as info:
        validate_images(images, (1, 28, 28))
    assert isinstance(info.value, ValueError) and isinstance(info.value, GradprobeError)
    assert expected in str(info.value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_images(probe, value):
    images = GOOD.copy()
    images[1, 0, 3, 4] = value
    with pytest.raises(InputError, match="NaN or Inf.*batch index 1"):
        probe.run(images)


@pytest.mark.parametrize("value", [1e18, np.finfo(np.float32).max, -1.0, 1.01])
def test_out_of_range_images_are_rejected(probe, value):
    """The documented rule: values must lie in the bundle's input range [0, 1] (with 1e-3 slack)."""
    images = GOOD.copy()
    images[1, 0, 5, 5] = value
    with pytest.raises(InputError, match=r"values in \[0.0, 1.0\].*batch index 1"):
        probe.run(images)
    images[1, 0, 5, 5] = 1.0005  # within the slack: accepted
    assert np.isfinite(probe.run(images).logits).all()


@pytest.mark.parametrize("contrast, fragment", [
    (10, "out of range.*0..9"),
    (-2, "out of range"),
    (np.uint64(2**64 - 1), "out of range"),
    (2**63, "out of range"),
    ([2**63, 1], "out of range"),
    (np.array([2**63, 1], dtype=np.uint64), "out of range"),
    ([0, 1, 2], "length 2"),
    (np.zeros((2, 1), np.int64), "Probe.explain"),
    (0.5, "class index or name"),
    (True, "class index or name"),
    ([0.5, 1], "class index or name"),
    ("Giraffe", "unknown contrast class name"),
    (["Coat", "Giraffe"], "unknown contrast class name"),
    ({"a": 1}, "got dict"),
    (np.array([1.0, 2.0]), "dtype float64"),
])
def test_bad_contrast(probe, contrast, fragment):
    with pytest.raises(InputError, match=fragment):
        probe.run(GOOD, contrast)


def test_contrast_by_name_index_mixed_and_broadcast(probe):
    assert probe.run(GOOD, "Coat").contrast_class.tolist() == [4, 4]
    assert probe.run(GOOD, [4, 4]).contrast_class.tolist() == [4, 4]
    assert probe.run(GOOD, ["Coat", 3]).contrast_class.tolist() == [4, 3]
    assert probe.run(GOOD, np.int8(2)).contrast_class.tolist() == [2, 2]
    assert probe.run(GOOD, np.array([1, 2], dtype=np.uint16)).contrast_class.tolist() == [1, 2]


def test_one_validator_for_run_and_explain():
    """Probe.run and Probe.explain read classes through the same function: same answers, same errors."""
    assert validate_contrast(["Coat", 3], 2, NAMES).tolist() == [4, 3]
    matrix, several = contrast_matrix([["Coat", 3], [0, "Bag"]], 2, NAMES)
    assert several and matrix.tolist() == [[4, 3], [0, 8]]
    for bad in ([["Coat", 2**70], [0, 1]], [["Coat"], [0, 1]], [[]]):
        with pytest.raises(InputError):
            contrast_matrix(bad, 2, NAMES)
