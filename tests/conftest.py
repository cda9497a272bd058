"""Shared fixtures (torch-free, so the runtime tests also run in a venv with only numpy and onnxruntime)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import gradprobe


@pytest.fixture(scope="session")
def fmnist_test():
    """The real Fashion-MNIST test split (Debian package dataset-fashion-mnist)."""
    return gradprobe.data.fashion_mnist("test")


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The standard bundles (tests/bundles.py): exported here with torch, or, in a venv without torch,
    read from $GRADPROBE_TEST_BUNDLES where an earlier step of the run exported them."""
    folder = os.environ.get("GRADPROBE_TEST_BUNDLES")
    if folder:
        from tests.bundles import BUNDLES

        paths = {name: Path(folder) / name for name in BUNDLES}
        missing = [str(p) for p in paths.values() if not (p / "manifest.json").exists()]
        assert not missing, f"$GRADPROBE_TEST_BUNDLES lacks {missing}: run `python -m tests.bundles {folder}`"
        return paths
    pytest.importorskip("torch", reason="exporting test bundles needs torch; or set GRADPROBE_TEST_BUNDLES")
    from tests.bundles import make_bundles

    return make_bundles(tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
