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


def _exported_bundles(names: dict, make: str, tmp_path_factory) -> dict[str, Path]:
    """Bundles ``names`` exported here with ``tests.bundles.<make>``, or, in a venv without torch, read from
    $GRADPROBE_TEST_BUNDLES where an earlier step of the run exported them."""
    folder = os.environ.get("GRADPROBE_TEST_BUNDLES")
    if folder:
        paths = {name: Path(folder) / name for name in names}
        missing = [str(p) for p in paths.values() if not (p / "manifest.json").exists()]
        assert not missing, f"$GRADPROBE_TEST_BUNDLES lacks {missing}: run `python -m tests.bundles {folder}`"
        return paths
    pytest.importorskip("torch", reason="exporting test bundles needs torch; or set GRADPROBE_TEST_BUNDLES")
    import tests.bundles

    return getattr(tests.bundles, make)(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The standard bundles (tests/bundles.py BUNDLES)."""
    from tests.bundles import BUNDLES

    return _exported_bundles(BUNDLES, "make_bundles", tmp_path_factory)


@pytest.fixture(scope="session")
def contrastive_bundles(tmp_path_factory) -> dict[str, Path]:
    """The contrastive bundles (tests/bundles.py CONTRASTIVE_BUNDLES): r_x in the graph, with and without a head."""
    from tests.bundles import CONTRASTIVE_BUNDLES

    return _exported_bundles(CONTRASTIVE_BUNDLES, "make_contrastive_bundles", tmp_path_factory)


@pytest.fixture(scope="session")
def gradcon_bundles(tmp_path_factory) -> dict[str, Path]:
    """The GradCon bundle (tests/bundles.py GRADCON_BUNDLES): a briefly trained detector, calibrated."""
    from tests.bundles import GRADCON_BUNDLES

    return _exported_bundles(GRADCON_BUNDLES, "make_gradcon_bundles", tmp_path_factory)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
