"""The GPND one-class protocol on the pooled Fashion-MNIST: fold sizes, outlier fractions, disjoint sets."""
import numpy as np
import pytest

from gradprobe import InputError
from gradprobe.data import fashion_mnist_pooled, gpnd_folds, gpnd_split


@pytest.fixture(scope="module")
def pooled():
    images, labels = fashion_mnist_pooled()
    return images, labels, gpnd_folds(labels)


def test_pool_holds_both_splits_and_folds_are_per_class_fifths(pooled):
    images, labels, folds = pooled
    assert images.shape == (70000, 1, 28, 28) and labels.shape == (70000,)
    for cls in range(10):
        assert np.bincount(folds[labels == cls], minlength=5).tolist() == [1400] * 5
    np.testing.assert_array_equal(gpnd_folds(labels), folds)          # seeded: the same folds every run
    assert not np.array_equal(gpnd_folds(labels, seed=1), folds)


@pytest.mark.parametrize("percent", [10, 20, 30, 40, 50])
def test_split_has_the_outlier_fraction_and_no_overlap(pooled, percent):
    _, labels, folds = pooled
    split = gpnd_split(labels, folds, normal_class=4, outlier_percent=percent)
    assert len(split["train"]) == 4200 and (labels[split["train"]] == 4).all()
    for name, fold in (("val", 3), ("test", 4)):
        index, outlier = split[name], split[f"{name}_outlier"]
        assert (folds[index] == fold).all() and ((labels[index] != 4) == outlier).all()
        assert (~outlier).sum() == 1400 and abs(outlier.mean() - percent / 100) < 0.002
    assert not set(split["train"]) & set(split["val"]) and not set(split["val"]) & set(split["test"])


def test_bad_arguments_say_what_is_expected(pooled):
    _, labels, folds = pooled
    with pytest.raises(InputError, match=r"\(0, 100\)"):
        gpnd_split(labels, folds, 1, 100)
    with pytest.raises(InputError, match="not a label"):
        gpnd_split(labels, folds, 12, 10)
