"""Detectors on synthetic gradient features: fit/score, thresholds, exact save/load, registry, errors."""
import io

import numpy as np
import pytest

from gradprobe import BundleError, InputError, NotFittedError
from gradprobe import detect as dt
from gradprobe.results import ProbeResult

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="fitting detectors needs scikit-learn")


def _features(rng, n, shift):
    return rng.normal(shift, 1.0, (n, 6))


def test_registry_has_one_vocabulary():
    assert set(dt.DETECTORS) == {"paper", "last-layer", "ood-free"}
    for name, cls in dt.DETECTORS.items():
        assert cls.name == name and issubclass(cls, dt.Detector) and cls.layers in ("all", "last")
    assert dt.DETECTORS["paper"].supervised and not dt.DETECTORS["ood-free"].supervised


@pytest.mark.parametrize("kind", ["paper", "ood-free"])
def test_detectors_separate_shifted_features_and_round_trip_exactly(kind, rng):
    cls = dt.DETECTORS[kind]
    inside, outside = _features(rng, 300, 0.0), _features(rng, 300, 2.5)
    labels = np.r_[np.zeros(300, int), np.ones(300, int)]
    detector = cls().fit(np.vstack([inside, outside]) if cls.supervised else inside, labels)
    test_in, test_out = _features(rng, 200, 0.0), _features(rng, 200, 2.5)
    scores = np.r_[detector.score(test_in), detector.score(test_out)]
    assert sklearn_metrics.roc_auc_score(np.r_[np.zeros(200), np.ones(200)], scores) > 0.95  # higher = anomalous
    loaded = cls.load(detector.save(), feature_count=6)
    for name, array in detector.fitted.items():
        np.testing.assert_array_equal(loaded.fitted[name], array)
    np.testing.assert_array_equal(loaded.score(test_out), detector.score(test_out))


def _npz(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_stored_arrays_are_checked_before_use(rng):
    good = dt.GaussianDetector().fit(_features(rng, 50, 0)).fitted
    cases = {
        "not a zip": b"garbage",
        "expected": _npz(mean=good["mean"]),                                           # missing precision
        "dims": _npz(mean=good["mean"], precision=np.eye(5)),                          # F mismatch
        "float64": _npz(mean=good["mean"].astype(np.float32), precision=good["precision"]),
        "NaN or Inf": _npz(mean=np.full(6, np.nan), precision=good["precision"]),
    }
    for words, data in cases.items():
        with pytest.raises(BundleError, match=words):
            dt.GaussianDetector.load(data, feature_count=6)
    with pytest.raises(BundleError, match="declares more than"):  # a bomb: refused before decompression
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=np.zeros(6), precision=np.zeros((9000, 9000)))
        dt.GaussianDetector.load(buffer.getvalue(), feature_count=6)


def test_unfitted_detectors_raise(rng):
    for cls in dt.DETECTORS.values():
        with pytest.raises(NotFittedError):
            cls().score(_features(rng, 3, 0))
        with pytest.raises(NotFittedError):
            cls().save()


def test_mlp_needs_both_labels(rng):
    with pytest.raises(InputError, match="labels"):
        dt.MLPDetector().fit(_features(rng, 10, 0), np.zeros(10, int))


def test_threshold_reproduces_tpr_on_held_out_scores(rng):
    threshold = dt.threshold_at_tpr(rng.normal(size=2000), 0.95)
    assert abs(np.mean(rng.normal(size=20000) <= threshold) - 0.95) < 0.02


def test_non_finite_samples_are_anomalous_with_a_reason():
    result = dt.detection_result(np.array([0.1, 5.0, np.nan, 0.2]), np.array([True, True, True, False]), 1.0, "paper")
    assert result.is_anomalous.tolist() == [False, True, True, True]
    assert result.reasons.tolist() == ["", "score above threshold", "non-finite outputs", "non-finite outputs"]
    assert np.isinf(result.score[2:]).all()


def _result(rng, batch=5, classes=10, dim=8, layers=None):
    logits = rng.normal(size=(batch, classes)).astype(np.float32)
    outputs = {"logits": logits, "probs": np.exp(logits) / np.exp(logits).sum(1, keepdims=True),
               "pred": logits.argmax(1), "features": np.abs(rng.normal(size=(batch, dim))),
               "confounding_grad_sqnorm": rng.random((batch, 2)) + 0.1}
    if layers is not None:
        outputs["layer_grad_sqnorm"] = layers
    return ProbeResult(outputs)


def test_gradnorm_closed_form_and_feature_choice(rng):
    result = _result(rng)
    p, h = result.probs.astype(np.float64), result.features
    np.testing.assert_allclose(dt.gradnorm_score(result), -np.abs(h).sum(1) * np.abs(p - 0.1).sum(1), rtol=1e-6)
    assert dt.gradient_features(result, "all").shape == (5, 2)
    deep = _result(rng, layers=rng.random((5, 62)))
    assert dt.gradient_features(deep, "all").shape == (5, 62) and dt.gradient_features(deep, "last").shape == (5, 2)
    np.testing.assert_allclose(dt.gradient_features(deep, "layer_grad_sqnorm"), np.log(deep.layer_grad_sqnorm + dt.EPS))
    with pytest.raises(InputError):
        dt.gradient_features(result, "first")


def test_fit_rejects_bad_kind_missing_ood_and_bad_tpr():
    images = np.zeros((20, 1, 28, 28), np.float32)
    with pytest.raises(InputError, match="unknown detector kind"):
        dt.fit_detector(None, images, images, kind="svm")
    with pytest.raises(InputError, match="pass ood"):
        dt.fit_detector(None, images, None, kind="paper")
    with pytest.raises(InputError, match="tpr"):
        dt.fit_detector(None, images, kind="ood-free", tpr=1.5)
