"""Detectors calibrated into a real bundle of the shipped model, scored on real Fashion-MNIST and digits."""
import inspect
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe import NotFittedError
from gradprobe import ood_data as od
from gradprobe.bundle import read_manifest
from gradprobe.evaluate import metrics

#: Measured 99.16 (last-layer features, 200+200 fit, 500 vs 500 eval); the bound leaves 2.2 points.
AUROC_DIGITS_BOUND = 97.0


@pytest.fixture
def bundle(exported, tmp_path):
    """A private copy: calibrating writes into the bundle."""
    return shutil.copytree(exported("pretrained")[1], tmp_path / "bundle")


@pytest.fixture(scope="module")
def digits_eval():
    return od.fmnist_part("eval", 500)[0], od.ood_set("digits", "eval", 500)


def test_uncalibrated_bundle_raises_not_fitted(bundle):
    with pytest.raises(NotFittedError, match="calibrate"):
        gradprobe.load(bundle).detect(np.zeros((2, 1, 28, 28), np.float32))


def test_paper_detector_separates_fmnist_from_digits(bundle, digits_eval):
    probe = gradprobe.load(bundle)
    section = probe.calibrate(od.fmnist_part("fit", 400), od.ood_set("digits", "fit", 200), kind="paper")
    assert section["fit"] == {"in_dist_train": 200, "in_dist_threshold": 200, "ood_train": 200, "seed": 0, "data": {}}
    inside, outside = (probe.detect(x) for x in digits_eval)
    assert metrics(inside.score, outside.score)["auroc"] > AUROC_DIGITS_BOUND
    assert outside.is_anomalous.mean() > 0.8 and inside.is_anomalous.mean() < 0.15


@pytest.mark.parametrize("kind", ["paper", "ood-free"])
def test_threshold_reproduces_tpr_on_held_out_in_distribution(bundle, kind):
    probe = gradprobe.load(bundle)
    ood = od.ood_set("digits", "fit", 300) if kind == "paper" else None
    probe.calibrate(od.fmnist_part("fit", 2000)[0], ood, kind=kind, tpr=0.95)
    held_out = od.fmnist_part("eval", 3000)[0]
    assert abs((1 - probe.detect(held_out).is_anomalous.mean()) - 0.95) < 0.02


def test_detector_round_trips_through_the_bundle(bundle, digits_eval):
    probe = gradprobe.load(bundle)
    probe.calibrate(od.fmnist_part("fit", 100), od.ood_set("uniform", "fit", 50), kind="last-layer",
                    description={"note": "test"})
    first = probe.manifest["detector"]["file"]
    assert first in read_manifest(bundle)["files"]
    before = probe.detect(digits_eval[1][:64])
    after = gradprobe.load(bundle).detect(digits_eval[1][:64])
    np.testing.assert_array_equal(before.score, after.score)
    assert after.threshold == before.threshold and after.kind == "last-layer"
    assert read_manifest(bundle)["detector"]["fit"]["data"] == {"note": "test"}
    probe.calibrate(od.fmnist_part("fit", 100), kind="ood-free")  # replaces the old detector file
    assert not (bundle / first).exists() and first not in read_manifest(bundle)["files"]


def test_detect_needs_neither_sklearn_nor_torch(bundle, tmp_path):
    gradprobe.load(bundle).calibrate(od.fmnist_part("fit", 60), od.ood_set("gaussian", "fit", 30), kind="paper")
    np.save(tmp_path / "x.npy", od.ood_set("digits", "eval", 4))
    code = ("import sys, numpy as np, gradprobe\n"
            f"r = gradprobe.load({str(bundle)!r}).detect(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(json.dumps([len(r.score), [m for m in ('torch', 'sklearn') if m in sys.modules]]))\n")
    out = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [4, []]


@pytest.mark.slow
def test_paper_detector_on_per_layer_gradients(tmp_path, digits_eval):
    from gradprobe.export.bundle import export_bundle

    if "layer_grads" not in inspect.signature(export_bundle).parameters:
        pytest.skip("this export has no layer_grads option")
    path = export_bundle(gradprobe.models.load_pretrained("resnet-fmnist"), digits_eval[0][:4], tmp_path / "b",
                         layer_grads=True)
    probe = gradprobe.load(path)
    section = probe.calibrate(od.fmnist_part("fit", 400), od.ood_set("digits", "fit", 200), kind="paper")
    assert section["features"] == "layer_grad_sqnorm" and section["feature_count"] > 2
    inside, outside = (probe.detect(x) for x in digits_eval)
    assert metrics(inside.score, outside.score)["auroc"] > AUROC_DIGITS_BOUND  # measured 99.8


@pytest.mark.peers
@pytest.mark.slow
def test_peer_gradnorm_equals_our_closed_form(bundle):
    from gradprobe.evaluate import peer_scores, peers_python

    if peers_python() is None:
        pytest.skip("no .venv-peers (make peers)")
    images = od.fmnist_part("eval", 16)[0]
    peers = peer_scores(bundle, {"x": images}, od.fmnist_part("fit", 200))
    from gradprobe.detect import gradnorm_score

    ours = gradnorm_score(gradprobe.load(bundle).run(images))
    np.testing.assert_allclose(peers["pytorch-ood GradNorm (fc.weight)"]["x"], ours, rtol=1e-4)


def test_calibrate_command_line(bundle, capsys):
    import argparse

    from gradprobe.evaluate import add_detect_commands

    parser = argparse.ArgumentParser(prog="gradprobe")
    add_detect_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["calibrate", str(bundle), "--kind", "ood-free", "--n-in", "100"])
    args.handler(args)
    assert json.loads(capsys.readouterr().out)["kind"] == "ood-free"
    assert read_manifest(bundle)["detector"]["fit"]["in_dist_threshold"] == 50
