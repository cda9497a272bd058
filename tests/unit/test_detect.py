"""Detectors on synthetic gradient features: fit/score, thresholds, exact save/load, metrics, errors."""
import numpy as np
import pytest

from gradprobe import InputError, NotFittedError
from gradprobe import detect as dt
from gradprobe.evaluate import metrics
from gradprobe.results import ProbeResult


def _features(rng, n, shift):
    return rng.normal(shift, 1.0, (n, 6))


@pytest.mark.parametrize("make", [dt.MLPDetector, dt.GaussianDetector])
def test_detectors_separate_shifted_features_and_round_trip_exactly(make, rng):
    inside, outside = _features(rng, 300, 0.0), _features(rng, 300, 2.5)
    labels = np.r_[np.zeros(300, int), np.ones(300, int)]
    detector = make().fit(np.vstack([inside, outside]) if make is dt.MLPDetector else inside, labels)
    test_in, test_out = _features(rng, 200, 0.0), _features(rng, 200, 2.5)
    assert metrics(detector.score(test_in), detector.score(test_out))["auroc"] > 95  # higher = more anomalous
    loaded = dt.from_npz(detector.kind, dt.to_npz(detector))
    for name, array in detector.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
    np.testing.assert_array_equal(loaded.score(test_out), detector.score(test_out))


def test_unfitted_detectors_raise(rng):
    for detector in (dt.MLPDetector(), dt.GaussianDetector()):
        with pytest.raises(NotFittedError):
            detector.score(_features(rng, 3, 0))


def test_mlp_needs_both_labels(rng):
    with pytest.raises(InputError, match="labels"):
        dt.MLPDetector().fit(_features(rng, 10, 0), np.zeros(10, int))


def test_threshold_reproduces_tpr_on_held_out_scores(rng):
    threshold = dt.threshold_at_tpr(rng.normal(size=2000), 0.95)
    assert abs(np.mean(rng.normal(size=20000) <= threshold) - 0.95) < 0.02


def test_metrics_of_perfect_and_reversed_scores():
    perfect = metrics(np.zeros(50), np.ones(50))
    assert perfect["auroc"] == 100 and perfect["fpr95"] == 0 and perfect["det_acc"] == 100
    assert metrics(np.ones(50), np.zeros(50))["auroc"] == 0


def _result(rng, batch=5, classes=10, dim=8, layers=None):
    logits = rng.normal(size=(batch, classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    zeros = np.zeros((batch, 2, 2), np.float32)
    features = np.abs(rng.normal(size=(batch, dim)))
    return ProbeResult(logits=logits, probs=probs, pred=logits.argmax(1), features=features,
                       contrast_class=np.zeros(batch, np.int64), label_grad_sqnorm=rng.random((batch, classes)),
                       confounding_grad_sqnorm=rng.random((batch, 2)) + 0.1, cam=zeros, contrastive_cam=zeros,
                       counterfactual_cam=zeros, layer_grad_sqnorm=layers)


def test_gradnorm_closed_form_and_feature_choice(rng):
    result = _result(rng)
    p, h = result.probs.astype(np.float64), result.features
    expected = -np.abs(h).sum(1) * np.abs(p - 0.1).sum(1)
    np.testing.assert_allclose(dt.gradnorm_score(result), expected, rtol=1e-6)
    assert dt.gradient_features(result).shape == (5, 2)
    deep = _result(rng, layers=rng.random((5, 62)))
    assert dt.gradient_features(deep, "all").shape == (5, 62) and dt.gradient_features(deep, "last").shape == (5, 2)
    with pytest.raises(InputError):
        dt.gradient_features(result, "first")


class _NoProbe:
    manifest = {}


def test_calibrate_rejects_bad_kind_and_missing_ood():
    images = np.zeros((20, 1, 28, 28), np.float32)
    with pytest.raises(InputError, match="unknown detector kind"):
        dt.calibrate(_NoProbe(), images, images, kind="svm")
    with pytest.raises(InputError, match="ood"):
        dt.calibrate(_NoProbe(), images, None, kind="paper")
    with pytest.raises(InputError, match="tpr"):
        dt.calibrate(_NoProbe(), images, kind="ood-free", tpr=1.5)
    with pytest.raises(InputError, match="N >= 10"):
        dt.calibrate(_NoProbe(), images[:3], kind="ood-free")
