"""Bundles for the harness tests: a tiny reference model (with weights) and the same graph without weights."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gradprobe
from gradprobe.base.bundle import Bundle, write_bundle

from benchmarks.harness import peers


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """resnet-tiny with seeded weights, exported once: (a)-(c) run on it in well under a second."""
    import torch

    from gradprobe.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet-tiny").eval()
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    return gradprobe.export(model, images, tmp_path_factory.mktemp("harness") / "tiny")


@pytest.fixture(scope="session")
def weightless_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle's graph and manifest without model.safetensors, as a bundle of a user's own model is."""
    opened = Bundle.open(tiny_bundle)
    manifest = opened.manifest
    manifest = dataclasses.replace(manifest, model=dataclasses.replace(manifest.model, weights=None))
    path = tmp_path_factory.mktemp("harness") / "weightless"
    return write_bundle(path, manifest, {manifest.graph: opened.read(manifest.graph)})


@pytest.fixture
def no_peers(monkeypatch, tmp_path):
    """$GRADPROBE_PEERS_PYTHON at a path that does not exist: every peer engine must skip, saying why."""
    missing = tmp_path / "no-venv" / "bin" / "python"
    monkeypatch.setenv(peers.PEERS_ENV, str(missing))
    return missing
