"""``Probe.explain`` maps equal autograd (docs/METHODS.md §3) and the peers, after the same upsample + normalisation.

- default suite (main venv): contrastive, counterfactual and Grad-CAM maps vs the per-sample autograd
  reference (CE with target Q; negated weights), for every reference model;
- ``peers`` (needs .venv-peers, skipped visibly without it): Grad-CAM vs ``pytorch_grad_cam.GradCAM`` on the same
  layer, run in the peers venv; its contrastive/counterfactual (custom targets) and Captum's LayerGradCam too.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gradprobe
from gradprobe.export.reference import ResearchReference
from gradprobe.viz import normalize_maps, upsample

from ..reference_models import REFERENCE_MODELS

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = Path(os.environ.get("GRADPROBE_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))
PEERS_SCRIPT = ROOT / "benchmarks" / "peers" / "explain_peers.py"
TOLERANCE = 1e-4
MAPS = ("cam", "contrastive_cam", "counterfactual_cam")


def _images(fmnist_test, count=32, seed=5):
    images, _ = fmnist_test
    return images[np.random.default_rng(seed).choice(len(images), count, replace=False)]


def _finish(raw, size):
    return normalize_maps(upsample(raw, size))


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_maps_match_autograd(name, exported, fmnist_test):
    model, bundle = exported(name)
    probe = gradprobe.load(bundle)
    images = _images(fmnist_test)
    classes = len(probe.class_names)
    contrast = (np.arange(len(images)) % (classes + 1) - 1).astype(np.int64)  # runner-up and every class
    ours = probe.explain(images, contrast)
    reference = ResearchReference.for_bundle(model, probe.manifest).run(images, contrast)
    assert (ours.pred == reference["pred"]).all() and (ours.contrast == reference["contrast_class"]).all()
    assert set(probe.map_names) >= {"cam", "contrastive_cam", "counterfactual_cam", "gradcam_pp"}
    for kind in probe.map_names:
        expected = _finish(reference[kind], images.shape[2:])
        error = np.abs(getattr(ours, kind) - expected).max()
        print(json.dumps({"model": name, "map": kind, "max_abs_error": float(error),
                          "empty_maps": int((~reference[kind].reshape(len(images), -1).any(1)).sum())}))
        assert error <= TOLERANCE, f"{name} {kind}: max |ours - autograd| = {error:.2e} > {TOLERANCE}"


def test_several_contrast_classes_match_autograd(exported, fmnist_test):
    """Three Q per image in one call: each contrastive map equals autograd with that Q."""
    model, bundle = exported("vgg-bn")  # a head with real backward (Linear/ReLU/BatchNorm1d)
    probe = gradprobe.load(bundle)
    images = _images(fmnist_test, count=8, seed=6)
    several = np.array([[0, 4, 9]] * len(images))
    ours = probe.explain(images, several)
    reference = ResearchReference.for_bundle(model, probe.manifest)
    for k in range(several.shape[1]):
        expected = _finish(reference.run(images, several[:, k])["contrastive_cam"], images.shape[2:])
        assert np.abs(ours.contrastive_cam[:, k] - expected).max() <= TOLERANCE


def _peer_maps(bundle, images, contrast, folder):
    manifest = gradprobe.load(bundle).manifest
    np.save(folder / "images.npy", images)
    np.save(folder / "contrast.npy", contrast)
    spec = {"checkpoint": str(Path(bundle) / manifest.model.weights), "threads": 2,
            "target_layer": manifest.classifier.target_layer,
            "normalize": {"mean": list(manifest.input.mean), "std": list(manifest.input.std)},
            "images": str(folder / "images.npy"), "contrast": str(folder / "contrast.npy"), "out": str(folder)}
    (folder / "spec.json").write_text(json.dumps(spec))
    completed = subprocess.run([str(PEERS_PYTHON), str(PEERS_SCRIPT), "maps", str(folder / "spec.json")],
                               capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return {path.stem: np.load(path) for path in folder.glob("*_*.npy")}


@pytest.mark.peers
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_gradcam_matches_pytorch_grad_cam(name, exported, fmnist_test, tmp_path):
    if not PEERS_PYTHON.exists():
        pytest.skip(f"peers venv not found at {PEERS_PYTHON}: run `make peers` (or set GRADPROBE_PEERS_PYTHON)")
    model, bundle = exported(name)
    probe = gradprobe.load(bundle)
    images = _images(fmnist_test, count=64, seed=7)
    ours = probe.explain(images)  # runner-up Q, resolved in ours.contrast and given to the peers as is
    peers = _peer_maps(bundle, images, ours.contrast, tmp_path)
    raw = probe.run(images, ours.contrast)
    report = {}
    for peer in ("gradcam", "captum"):
        for kind in MAPS:
            error = np.abs(getattr(ours, kind) - peers[f"{peer}_{kind}"]).reshape(len(images), -1).max(axis=1)
            peak = getattr(raw, kind).reshape(len(images), -1).max(axis=1)
            typical = np.median(peak[peak > 0]) if (peak > 0).any() else 0.0
            # A map whose range is < 5% of a typical map's is near-empty: float32 rounding of sum_k alpha_k A_k
            # (~1e-7 absolute, numpy vs torch summation order) is stretched by the min-max normalisation.
            # Those are held to the same 1e-4, but in units of a typical map's peak.
            tiny = peak < 0.05 * typical
            report[f"{peer}_{kind}"] = {"max_abs_error": float(error[~tiny].max(initial=0)),
                                        "near_empty_maps": int(tiny.sum()),
                                        "near_empty_error_in_typical_units": float(
                                            (error * peak)[tiny].max(initial=0) / max(typical, 1e-30))}
    print(json.dumps({"model": name, "peers": report}))
    failing = {k: v for k, v in report.items()
               if v["max_abs_error"] > TOLERANCE or v["near_empty_error_in_typical_units"] > TOLERANCE}
    assert "gradcam_cam" not in failing, f"{name}: Grad-CAM vs pytorch_grad_cam.GradCAM {report['gradcam_cam']}"
    assert not failing, f"{name}: peer maps beyond {TOLERANCE}: {failing}"
