"""Detectors calibrated into real bundles of the shipped model, scored on real Fashion-MNIST and digits."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe import NotFittedError
from gradprobe.base.bundle import Bundle
from gradprobe.data import fmnist_part, ood_set

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="calibrating detectors needs scikit-learn")

#: Measured 99.16 (last-layer features) and 99.8 (per-layer), 500 vs 500 eval; the bound leaves >2 points.
AUROC_DIGITS_BOUND = 0.97


def _auroc(inside, outside):
    return sklearn_metrics.roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside])


@pytest.fixture
def plain(bundles, tmp_path):
    """A private copy: calibrating writes into the bundle."""
    return shutil.copytree(bundles["plain"], tmp_path / "plain")


@pytest.fixture
def deep(bundles, tmp_path):
    return shutil.copytree(bundles["deep"], tmp_path / "deep")


@pytest.fixture(scope="module")
def digits_eval():
    return fmnist_part("eval", 500)[0], ood_set("digits", "eval", 500)


def test_uncalibrated_bundle_raises_not_fitted(plain):
    with pytest.raises(NotFittedError, match="calibrate"):
        gradprobe.load(plain).detect(np.zeros((2, 1, 28, 28), np.float32))


@pytest.mark.parametrize("which", ["plain", "deep"])
def test_paper_detector_separates_fmnist_from_digits(which, request, digits_eval):
    probe = gradprobe.load(request.getfixturevalue(which))
    section = probe.calibrate(fmnist_part("fit", 400), ood_set("digits", "fit", 200), kind="paper")
    assert section.features == ("layer_grad_sqnorm" if which == "deep" else "confounding_grad_sqnorm")
    assert section.feature_count == (62 if which == "deep" else 2)
    assert {k: section.fit[k] for k in ("in_dist_train", "in_dist_threshold", "ood_train")} == \
        {"in_dist_train": 200, "in_dist_threshold": 200, "ood_train": 200}
    inside, outside = (probe.detect(x) for x in digits_eval)
    assert _auroc(inside.score, outside.score) > AUROC_DIGITS_BOUND
    assert outside.is_anomalous.mean() > 0.8 and inside.is_anomalous.mean() < 0.15


@pytest.mark.parametrize("kind", ["paper", "ood-free"])
def test_threshold_reproduces_tpr_on_held_out_in_distribution(plain, kind):
    probe = gradprobe.load(plain)
    ood = ood_set("digits", "fit", 300) if kind == "paper" else None
    probe.calibrate(fmnist_part("fit", 2000)[0], ood, kind=kind, tpr=0.95)
    held_out = fmnist_part("eval", 3000)[0]
    assert abs((1 - probe.detect(held_out).is_anomalous.mean()) - 0.95) < 0.02


def test_detector_round_trips_through_the_bundle(plain, digits_eval):
    probe = gradprobe.load(plain)
    probe.calibrate(fmnist_part("fit", 100), ood_set("uniform", "fit", 50), kind="last-layer",
                    description={"note": "test"})
    first = probe.manifest.detector.file
    assert first in Bundle.open(plain).manifest.files
    before = probe.detect(digits_eval[1][:64])
    after = gradprobe.load(plain).detect(digits_eval[1][:64])
    np.testing.assert_array_equal(before.score, after.score)
    assert after.threshold == before.threshold and after.kind == "last-layer"
    assert Bundle.open(plain).manifest.detector.fit["data"] == {"note": "test"}
    probe.calibrate(fmnist_part("fit", 100), kind="ood-free")  # replaces the old detector file
    assert not (plain / first).exists() and first not in Bundle.open(plain).manifest.files


def test_detect_needs_neither_sklearn_nor_torch(plain, tmp_path):
    gradprobe.load(plain).calibrate(fmnist_part("fit", 60), ood_set("gaussian", "fit", 30), kind="paper")
    np.save(tmp_path / "x.npy", ood_set("digits", "eval", 4))
    code = ("import json, sys, numpy as np, gradprobe\n"
            f"r = gradprobe.load({str(plain)!r}).detect(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(json.dumps([len(r.score), [m for m in ('torch', 'sklearn') if m in sys.modules]]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [4, []]


def test_calibrate_command_line(plain, capsys):
    from gradprobe.cli import main

    assert main(["calibrate", str(plain), "--kind", "ood-free", "--n-in", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "ood-free"
    assert Bundle.open(plain).manifest.detector.fit["in_dist_threshold"] == 50
