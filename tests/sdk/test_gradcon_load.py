"""GradCon bundles through ``gradprobe.load``: scores, decisions, calibration, damage. No torch needed
(the runtime-only CI step runs this file on bundles exported beforehand)."""
import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe import BundleError, InputError, NotFittedError
from gradprobe.detect import DetectionResult, f1_of_normal, threshold_max_f1
from tests.bundles import copy_bundle, edit_manifest


@pytest.fixture(scope="module")
def probe(gradcon_bundles):
    with gradprobe.load(gradcon_bundles["gradcon"], threads=1) as loaded:
        yield loaded


def _auc(anomalous_scores, normal_scores) -> float:
    """P(anomalous score > normal score), ties half: the ROC area with anomalies positive."""
    a, n = np.asarray(anomalous_scores)[:, None], np.asarray(normal_scores)[None, :]
    return float(np.mean((a > n) + 0.5 * (a == n)))


def test_load_gives_the_gradcon_facade(probe):
    assert type(probe).__name__ == "GradConProbe"
    assert probe.input_shape == (1, 28, 28)
    assert probe.manifest.kind == "gradcon" and probe.threshold is not None
    assert "threshold=" in repr(probe)


def test_detect_separates_trousers_from_the_other_classes(probe, fmnist_test):
    images, labels = fmnist_test
    images, labels = images[:1000], labels[:1000]
    result = probe.detect(images)
    assert isinstance(result, DetectionResult) and result.kind == "gradcon"
    assert result.threshold == probe.threshold
    np.testing.assert_array_equal(result.is_anomalous, result.score > result.threshold)
    assert _auc(result.score[labels != 1], result.score[labels == 1]) > 0.85
    assert result.is_anomalous[labels != 1].mean() > result.is_anomalous[labels == 1].mean() + 0.3


def test_score_is_the_negated_normality_of_the_paper(probe, fmnist_test):
    result = probe.run(fmnist_test[0][:64])
    beta = probe.section.beta
    np.testing.assert_allclose(result.score, -result.normality, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.normality, -result.recon_loss + beta * result.cosine.mean(1), atol=1e-6)
    assert result.cosine.shape == (64, len(probe.section.decoder_weights))
    assert np.all(np.abs(result.cosine) <= 1 + 1e-5) and np.all(result.recon_loss >= 0)


def test_batches_and_chunks_agree(gradcon_bundles, probe, fmnist_test):
    images = fmnist_test[0][:37]
    whole = probe.run(images).score
    one = np.concatenate([probe.run(images[i:i + 1]).score for i in range(len(images))])
    with gradprobe.load(gradcon_bundles["gradcon"], max_batch=8) as chunked:
        np.testing.assert_allclose(chunked.run(images).score, whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-7)


def test_calibrate_stores_the_threshold_in_the_bundle(gradcon_bundles, fmnist_test, tmp_path):
    copy = copy_bundle(gradcon_bundles["gradcon"], tmp_path)
    images, labels = fmnist_test
    normal, others = images[labels == 1][:300], images[labels != 1][:300]
    with gradprobe.load(copy) as probe:
        section = probe.calibrate(normal, tpr=0.9)
        accepted = np.mean(probe.run(normal).score <= section.threshold)
    assert section.calibration["rule"] == "tpr" and 0.88 <= accepted <= 0.92
    with gradprobe.load(copy) as reloaded:  # another process would see it too
        assert reloaded.threshold == section.threshold
        section = reloaded.calibrate(normal, others)
        assert section.calibration == {"normal": 300, "anomalous": 300, "data": {}, "rule": "max_f1"}
        scores = np.r_[reloaded.run(normal).score, reloaded.run(others).score]
    is_anomalous = np.r_[np.zeros(300, bool), np.ones(300, bool)]
    best = f1_of_normal(scores, is_anomalous, section.threshold)
    for other in np.quantile(scores, np.linspace(0.01, 0.99, 25)):
        assert f1_of_normal(scores, is_anomalous, other) <= best + 1e-12


def test_threshold_max_f1_on_a_hand_made_case():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 1.0])
    is_anomalous = np.array([False, False, False, True, True, True])
    threshold = threshold_max_f1(scores, is_anomalous)
    assert 0.3 < threshold < 0.4 and f1_of_normal(scores, is_anomalous, threshold) == 1.0
    assert threshold_max_f1(np.array([1.0, 1.0, 1.0]), np.array([False, True, False])) == 1.0  # ties: accept all
    with pytest.raises(InputError, match="normal"):
        threshold_max_f1(scores, np.ones(6, bool))


def test_uncalibrated_bundle_refuses_to_decide(gradcon_bundles, fmnist_test, tmp_path):
    copy = copy_bundle(gradcon_bundles["gradcon"], tmp_path)
    edit_manifest(copy, lambda m: m["gradcon"].update(threshold=None, calibration={}))
    with gradprobe.load(copy) as probe:
        assert probe.run(fmnist_test[0][:3]).score.shape == (3,)
        with pytest.raises(NotFittedError, match="calibrate"):
            probe.detect(fmnist_test[0][:3])


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 28, 28), np.float32), "rank 4"),
    (np.zeros((2, 3, 28, 28), np.float32), "1 channel"),
    (np.zeros((2, 1, 28, 28), np.float64), "float32"),
    (np.full((2, 1, 28, 28), 255, np.float32), r"\[0.0, 1.0\]"),
])
def test_bad_images_say_what_is_expected(probe, images, message):
    with pytest.raises(InputError, match=message):
        probe.detect(images)


def test_bad_calibration_data_says_what_is_expected(probe, fmnist_test):
    with pytest.raises(InputError, match="N >= 10"):
        probe.calibrate(fmnist_test[0][:3])
    with pytest.raises(InputError, match="tpr"):
        probe.calibrate(fmnist_test[0][:20], tpr=1.5)


@pytest.mark.parametrize("change, message", [
    (lambda m: m["graph"]["outputs"][3].update(shape=["B", 3]), "one name per column"),
    (lambda m: m["graph"]["outputs"].pop(1), "outputs"),
    (lambda m: m["gradcon"].update(threshold="NaN"), "gradcon.threshold"),
    (lambda m: m["gradcon"].update(calibration={"rule": "guess"}), "calibration.rule"),
    (lambda m: m["gradcon"].pop("beta"), "gradcon.beta"),
    (lambda m: m.update(kind="other"), "kind"),
])
def test_damaged_gradcon_manifest_is_refused(gradcon_bundles, tmp_path, change, message):
    copy = copy_bundle(gradcon_bundles["gradcon"], tmp_path)
    edit_manifest(copy, change)
    with pytest.raises(BundleError, match=message):
        gradprobe.load(copy)


def test_each_facade_refuses_the_other_kind(gradcon_bundles, bundles):
    from gradprobe.gradcon import GradConProbe
    from gradprobe.probe import Probe

    with pytest.raises(BundleError, match="'gradcon' bundle"):
        Probe(gradcon_bundles["gradcon"])
    with pytest.raises(BundleError, match="'classifier' bundle"):
        GradConProbe(bundles["plain"])


def test_detect_runs_without_torch(gradcon_bundles, fmnist_test, tmp_path):
    np.save(tmp_path / "x.npy", fmnist_test[0][:5])
    code = (f"import sys, numpy as np, gradprobe; r = gradprobe.load({str(gradcon_bundles['gradcon'])!r})"
            f".detect(np.load({str(tmp_path / 'x.npy')!r})); print(r.score.shape, r.kind, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(5,) gradcon False"
