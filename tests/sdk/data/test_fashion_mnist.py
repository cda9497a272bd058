import gzip

import numpy as np
import pytest

from gradprobe.data import fashion_mnist
from gradprobe import DataError, InputError


def test_fashion_mnist_real_files(fmnist_test):
    images, labels = fmnist_test
    assert images.shape == (10000, 1, 28, 28) and images.dtype == np.float32
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels).tolist() == [1000] * 10


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist("test", directory=tmp_path)


def test_bad_split():
    with pytest.raises(InputError, match="'train' or 'test'"):
        fashion_mnist("validation")


def test_truncated_idx(tmp_path):
    header = bytes([0, 0, 8, 3]) + np.array([10, 28, 28], ">u4").tobytes()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + bytes(100))
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + bytes(10))
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist("test", directory=tmp_path)
