"""``Probe.explain`` maps equal autograd (docs/METHODS.md §3) and the peers, after the same upsample + normalisation.

- default suite (main venv): contrastive, counterfactual and Grad-CAM maps vs the per-sample autograd
  reference (CE with target Q; negated weights), for every reference model;
- ``peers`` (needs .venv-peers, skipped visibly without it): Grad-CAM vs ``pytorch_grad_cam.GradCAM`` and Grad-CAM++
  vs ``GradCAMPlusPlus`` on the same layer, run in the peers venv through the harness's peers runner; its
  contrastive/counterfactual (custom targets) and Captum's LayerGradCam are reported too.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradprobe
from gradprobe.export.reference import ResearchReference
from gradprobe.viz import normalize_maps, upsample

from benchmarks.harness import peers as peer_runner

from ..reference_models import REFERENCE_MODELS

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
    np.save(folder / "images.npy", images)
    np.save(folder / "contrast.npy", contrast)
    spec = {**peer_runner.model_spec(bundle), "images": str(folder / "images.npy"),
            "contrast": str(folder / "contrast.npy"), "out": str(folder / "maps")}
    peer_runner.run_peer("explain_peers.py", spec, "maps", timeout=900)
    return {path.stem: np.load(path) for path in (folder / "maps").glob("*_*.npy")}


@pytest.mark.peers
@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_gradcam_matches_pytorch_grad_cam(name, exported, fmnist_test, tmp_path):
    try:
        peer_runner.find_peers_python()
    except peer_runner.PeersUnavailable as missing:
        pytest.skip(str(missing))
    model, bundle = exported(name)
    probe = gradprobe.load(bundle)
    images = _images(fmnist_test, count=64, seed=7)
    ours = probe.explain(images)  # runner-up Q, resolved in ours.contrast and given to the peers as is
    peers = _peer_maps(bundle, images, ours.contrast, tmp_path)
    raw = probe.run(images, ours.contrast)
    report = {}
    for peer, kinds in (("gradcam", MAPS + ("gradcam_pp",)), ("captum", MAPS)):
        for kind in kinds:
            if f"{peer}_{kind}" not in peers:  # Captum absent from the peers venv: reported, not compared
                report[f"{peer}_{kind}"] = {"missing": True, "max_abs_error": 0.0,
                                            "near_empty_error_in_typical_units": 0.0}
                continue
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
    assert "gradcam_gradcam_pp" not in failing, \
        f"{name}: Grad-CAM++ vs pytorch_grad_cam.GradCAMPlusPlus {report['gradcam_gradcam_pp']}"
    assert not failing, f"{name}: peer maps beyond {TOLERANCE}: {failing}"
