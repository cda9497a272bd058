"""Every ONNX Runtime output equals PyTorch autograd on the eager model, per sample (one backward per label/map)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradprobe
from gradprobe.export.parity import RELATIVE, parity_errors
from gradprobe.export.reference import ResearchReference

from ..reference_models import REFERENCE_MODELS


def _inputs(kind: str, batch: int, fmnist_test):
    if kind == "real":
        images, _ = fmnist_test
        return images[np.random.default_rng(batch).choice(len(images), batch, replace=False)]
    return np.random.default_rng(batch).random((batch, 1, 28, 28), dtype=np.float32)


def _contrast(batch: int, classes: int):
    # runner-up (-1) for some images, every explicit class for the others
    return (np.arange(batch) % (classes + 1) - 1).astype(np.int64)


@pytest.mark.parametrize("kind", ["random", "real"])
@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_ort_matches_autograd(name, batch, kind, exported, fmnist_test):
    model, bundle = exported(name)
    probe = gradprobe.load(bundle)
    manifest = probe.manifest
    images = _inputs(kind, batch, fmnist_test)
    contrast = _contrast(batch, len(probe.class_names))
    ours = probe.run(images, contrast)
    reference = ResearchReference.for_bundle(model, manifest).run(images, contrast)
    errors = parity_errors(ours.as_dict(), reference)
    print(json.dumps({"model": name, "batch": batch, "inputs": kind, "errors": errors}))
    assert errors["pred"] == 0 and errors["contrast_class"] == 0, errors
    failing = {k: v for k, v in errors.items() if v > RELATIVE}
    assert not failing, f"{name} batch {batch} {kind}: outputs beyond {RELATIVE}: {failing}"
    for kind_of_map in ("cam", "contrastive_cam", "counterfactual_cam"):
        # maps have no natural scale: also compare relative to each reference map's own peak
        ours_map, expected = getattr(ours, kind_of_map), reference[kind_of_map]
        peak = np.abs(expected).reshape(batch, -1).max(axis=1)
        difference = np.abs(ours_map - expected).reshape(batch, -1).max(axis=1)
        # a near-empty map (peak under 5 % of a typical one) is a sum of terms that cancel: its float32 rounding
        # is of the typical map's size, so it is held to the bound in units of the typical peak
        typical = np.median(peak[peak > 0]) if (peak > 0).any() else 0.0
        scale = np.where(peak < 0.05 * typical, typical, peak)
        assert (difference <= RELATIVE * scale + 1e-7).all(), (kind_of_map, (difference / np.maximum(scale, 1e-12)).max())
    if batch == 64:  # the maps under test are not degenerate
        assert (reference["cam"] > 0).mean() > 0.2 and (reference["contrastive_cam"] > 0).mean() > 0.05
