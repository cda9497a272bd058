"""OOD sets and corruptions: shapes, range, determinism, disjoint fit/eval parts, clear errors."""
import sys

import numpy as np
import pytest

from gradprobe import DataError, InputError
from gradprobe.data import ood as od


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADPROBE_CACHE", str(tmp_path))


@pytest.mark.parametrize("name", sorted(od.OOD_SETS))
def test_ood_sets_are_images_in_range_and_deterministic(name):
    a, b = od.ood_set(name, "eval", 20), od.ood_set(name, "eval", 20)
    assert a.shape == (20, 1, 28, 28) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.01
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, od.ood_set(name, "fit", 20)), "fit and eval parts must differ"


def test_digits_parts_are_disjoint_and_cover_the_set():
    fit, evaluation = od.ood_set("digits", "fit"), od.ood_set("digits", "eval")
    assert len(fit) == 600 and len(evaluation) == 1797 - 600
    assert abs(evaluation.max() - 1.0) < 0.05  # rescaled to Fashion-MNIST's [0, 1]


def test_fmnist_parts_are_disjoint(fmnist_test):
    fit, _ = od.fmnist_part("fit")
    evaluation, _ = od.fmnist_part("eval")
    flat = {x.tobytes() for x in fit}
    assert sum(x.tobytes() in flat for x in evaluation) <= 5  # exact duplicates exist in FMNIST itself


@pytest.mark.parametrize("kind", od.CORRUPTIONS)
def test_corruptions_are_deterministic_and_grow_with_level(kind):
    clean, _ = od.fmnist_part("eval", 16)
    changes = []
    for level in od.LEVELS:
        out = od.corrupt(clean, kind, level, seed=3)
        assert out.shape == clean.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        np.testing.assert_array_equal(out, od.corrupt(clean, kind, level, seed=3))
        changes.append(float(np.abs(out - clean).mean()))
    assert changes[0] > 0.001 and changes[-1] > changes[0]


def test_corrupted_fmnist_cache_returns_the_same_images():
    a, labels = od.corrupted_fmnist("snow", 2, "eval", 8)
    b, _ = od.corrupted_fmnist("snow", 2, "eval", 8)  # second call reads the cache
    np.testing.assert_array_equal(a, b)
    assert len(labels) == 8


def test_bad_arguments_raise_input_errors():
    clean = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(InputError, match="unknown corruption"):
        od.corrupt(clean, "fog", 1)
    with pytest.raises(InputError, match="level"):
        od.corrupt(clean, "noise", 6)
    with pytest.raises(InputError, match="shape"):
        od.corrupt(clean[:, 0], "noise", 1)
    with pytest.raises(InputError, match="unknown OOD set"):
        od.ood_set("svhn")
    with pytest.raises(InputError, match="split"):
        od.ood_set("uniform", "train")


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="pip install scikit-learn"):
        od.ood_set("digits")
