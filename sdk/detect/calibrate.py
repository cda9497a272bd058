"""Fitting a registered detector on a probe's gradient features, and turning scores into decisions."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from gradprobe.base.errors import InputError
from gradprobe.base.manifest import DetectorSection

from .base import DETECTORS, Detector
from .features import feature_source, gradient_features


def threshold_at_tpr(in_scores, tpr: float = 0.95) -> float:
    """The score below which a fraction ``tpr`` of in-distribution inputs fall (they are accepted)."""
    return float(np.quantile(np.asarray(in_scores, np.float64), tpr, method="higher"))


def f1_of_normal(scores, is_anomalous, threshold: float) -> float:
    """F1 with normal inputs as the positive class (the GPND protocol's F1): accepted when score <= threshold."""
    accepted, normal = np.asarray(scores) <= threshold, ~np.asarray(is_anomalous, bool)
    return 2.0 * float(np.sum(accepted & normal)) / max(float(accepted.sum() + normal.sum()), 1.0)


def threshold_max_f1(scores, is_anomalous) -> float:
    """The threshold of highest ``f1_of_normal`` on labelled data, halfway between two distinct scores."""
    scores, is_anomalous = np.asarray(scores, np.float64), np.asarray(is_anomalous, bool)
    if scores.ndim != 1 or scores.shape != is_anomalous.shape or not np.isfinite(scores).all():
        raise InputError(f"threshold_max_f1 needs finite scores [N] and labels [N], got {list(scores.shape)} "
                         f"and {list(is_anomalous.shape)}")
    if is_anomalous.all():
        raise InputError("threshold_max_f1 needs some normal inputs, got only anomalous ones")
    order = np.argsort(scores, kind="stable")
    ranked, normal = scores[order], ~is_anomalous[order]
    accepted = np.arange(1, len(ranked) + 1)                   # accept the k lowest scores
    f1 = 2.0 * np.cumsum(normal) / (accepted + normal.sum())
    cut = np.r_[ranked[1:] > ranked[:-1], True]                # only between distinct scores
    best = int(np.argmax(np.where(cut, f1, -1.0)))
    return float(ranked[best]) if best == len(ranked) - 1 else float((ranked[best] + ranked[best + 1]) / 2)


@dataclass(frozen=True)
class DetectionResult:
    """``score`` [B] (higher = more anomalous) and the decision ``is_anomalous`` [B] with its ``reasons``.

    A sample whose outputs are not finite (an input the model cannot handle) is always anomalous, with
    score +inf and reason "non-finite outputs".
    """

    score: np.ndarray
    is_anomalous: np.ndarray
    threshold: float
    kind: str
    reasons: np.ndarray
    probe: object = None

    def __len__(self) -> int:
        return len(self.score)


def detection_result(score: np.ndarray, finite: np.ndarray, threshold: float, kind: str, probe=None) -> DetectionResult:
    """Decisions from scores: above the threshold, or not finite (never silently normal)."""
    finite = finite & np.isfinite(score)
    score = np.where(finite, score, np.inf)
    above = score > threshold
    reasons = np.where(~finite, "non-finite outputs", np.where(above, "score above threshold", ""))
    return DetectionResult(score=score, is_anomalous=above | ~finite, threshold=threshold, kind=kind,
                           reasons=reasons, probe=probe)


def _images(data, what: str, minimum: int = 10) -> np.ndarray:
    if isinstance(data, tuple):  # (images, labels) as gradprobe.data returns them
        data = data[0]
    if not isinstance(data, np.ndarray) or data.ndim != 4 or len(data) < minimum:
        raise InputError(f"{what} must be images [N, C, H, W] with N >= {minimum}, got "
                         f"{list(getattr(data, 'shape', [])) or type(data).__name__}")
    return data


def _check_finite(features: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad.size:
        raise InputError(f"{what} holds {bad.size} image(s) whose gradient features are not finite (first at index "
                         f"{int(bad[0])}): the model overflows on them; calibrate on images it handles")


def fit_detector(probe, in_dist, ood=None, *, kind: str = "paper", tpr: float = 0.95, seed: int = 0,
                 description: dict | None = None, **options) -> tuple[DetectorSection, Detector, bytes]:
    """Fit detector ``kind`` on ``probe``'s features; returns its manifest section, the detector, its file bytes.

    ``in_dist``: in-distribution images (or ``(images, labels)``); a seeded half trains the detector, the
    other half sets the threshold at ``tpr``. ``ood``: anomalous images for supervised kinds, all used
    for training. ``options`` go to the detector (e.g. ``hidden`` for the MLPs).
    """
    if kind not in DETECTORS:
        raise InputError(f"unknown detector kind {kind!r}; expected one of {sorted(DETECTORS)}")
    if isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.5 <= tpr < 1:
        raise InputError(f"tpr must be in [0.5, 1), got {tpr!r}")
    cls = DETECTORS[kind]
    if cls.supervised and ood is None:
        raise InputError(f"kind={kind!r} trains a classifier on in-distribution and OOD images: pass ood=..., "
                         f"or use an unsupervised kind ({[k for k, c in DETECTORS.items() if not c.supervised]})")
    in_images = _images(in_dist, "in_dist")
    source = feature_source(cls.layers, [spec.name for spec in probe.manifest.outputs])
    order = np.random.default_rng(seed).permutation(len(in_images))
    train, held = order[: len(order) // 2], order[len(order) // 2:]
    in_features = gradient_features(probe.run(in_images), source)
    _check_finite(in_features, "in_dist")
    if cls.supervised:
        ood_features = gradient_features(probe.run(_images(ood, "ood")), source)
        _check_finite(ood_features, "ood")
        features = np.vstack([in_features[train], ood_features])
        labels = np.r_[np.zeros(len(train), int), np.ones(len(ood_features), int)]
    else:
        ood_features, features, labels = np.empty((0, in_features.shape[1])), in_features[train], None
    detector = cls(seed=seed, **options).fit(features, labels)
    threshold = threshold_at_tpr(detector.score(in_features[held]), tpr)
    data = detector.save()
    section = DetectorSection(
        kind=kind, file=f"detector-{hashlib.sha256(data).hexdigest()[:16]}.npz", features=source,
        feature_count=int(in_features.shape[1]), threshold=threshold, tpr=float(tpr),
        fit={"in_dist_train": int(len(train)), "in_dist_threshold": int(len(held)), "ood_train": len(ood_features),
             "seed": seed, "options": detector.options, "transform": "log(x + 1e-20)",
             "data": description or {}})
    return section, detector, data
