"""Label-preserving shifts of real Fashion-MNIST images: what each one does, determinism, and argument checks."""
import numpy as np
import pytest

from gradprobe import InputError
from gradprobe.data import SHIFTS, fmnist_part, shift_images


@pytest.fixture(scope="module")
def images():
    return fmnist_part("eval", 40)[0]


def _centre_of_mass(x: np.ndarray) -> np.ndarray:
    rows, cols = np.mgrid[:28, :28]
    mass = x[:, 0].sum(axis=(1, 2))
    return np.stack([(x[:, 0] * rows).sum(axis=(1, 2)) / mass, (x[:, 0] * cols).sum(axis=(1, 2)) / mass], axis=1)


def test_every_shift_keeps_shape_range_and_is_deterministic(images):
    for kind, levels in SHIFTS.items():
        for level in range(1, len(levels) + 1):
            out = shift_images(images, kind, level, seed=3)
            assert out.shape == images.shape and out.dtype == np.float32
            assert out.min() >= 0 and out.max() <= 1
            np.testing.assert_array_equal(out, shift_images(images, kind, level, seed=3))
            assert np.abs(out - images).mean() > 0.01, (kind, level)  # it changed the images


def test_what_each_shift_does(images):
    np.testing.assert_allclose(shift_images(images, "invert", 1), 1 - images, atol=1e-7)
    # translation moves the garment by about the level's pixels, without changing its ink much
    moved = shift_images(images, "translation", 2)
    distance = np.linalg.norm(_centre_of_mass(moved) - _centre_of_mass(images), axis=1)
    assert np.median(distance) == pytest.approx(4.0, abs=0.6)
    # scale shrinks the garment about the centre: ink falls with the area, the centre stays
    small = shift_images(images, "scale", 3)
    ink = small.sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))
    assert np.median(ink) == pytest.approx(0.55 ** 2, rel=0.1)
    # rotation keeps the ink (the garment stays inside the frame) and changes more with the angle
    turned = [shift_images(images, "rotation", level) for level in (1, 3)]
    assert np.median(turned[1].sum(axis=(1, 2, 3)) / images.sum(axis=(1, 2, 3))) == pytest.approx(1, abs=0.08)
    assert np.abs(turned[1] - images).mean() > 1.5 * np.abs(turned[0] - images).mean()


def test_arguments_are_checked(images):
    with pytest.raises(InputError, match="unknown shift 'flip'"):
        shift_images(images, "flip", 1)
    with pytest.raises(InputError, match=r"level of 'invert' must be one of \[1\]"):
        shift_images(images, "invert", 2)
    with pytest.raises(InputError, match="must have shape"):
        shift_images(images[:, :, :20], "rotation", 1)
