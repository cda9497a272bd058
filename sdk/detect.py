"""OOD / corrupted-input detectors on gradient features (METHODS.md §1), calibrated into the bundle.

Every score here is oriented one way: **higher means more anomalous**. Fitting uses scikit-learn
(imported inside ``fit``); scoring is plain numpy, so ``Probe.detect`` needs neither sklearn nor torch.

Kinds (``Probe.calibrate(in_dist, ood, kind=...)``):
- ``"paper"``: Lee & AlRegib (ICIP 2020): log squared gradient norms of every parameter tensor under the
  all-ones confounding label (``layer_grad_sqnorm`` when the bundle was exported with ``layer_grads=True``,
  else the last Linear's weight and bias) -> a 2-layer MLP binary classifier trained on labelled
  in-distribution + OOD samples.
- ``"last-layer"``: the same MLP on the last Linear's two norms only (``confounding_grad_sqnorm``).
- ``"ood-free"``: no OOD data: squared Mahalanobis distance of the log gradient norms to their
  in-distribution Gaussian (two-sided, so it needs no guess of the norm's sign).
Each detector's threshold is the ``tpr`` quantile of its scores on in-distribution images it was not
trained on, so ``tpr`` (default 95%) of in-distribution inputs pass.
"""
from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass

import numpy as np

from .bundle import SCORE_ORIENTATION, update_manifest
from .errors import BundleError, InputError, NotFittedError
from .results import ProbeResult

KINDS = ("paper", "last-layer", "ood-free")
SECTION = "detector"
_EPS = 1e-20


def gradient_features(result: ProbeResult, layers: str = "all") -> np.ndarray:
    """log ||dJ/dθ_i||² per parameter tensor θ_i, J = BCE(z, all-ones) (METHODS.md §1), float64 [B, F].

    ``layers="all"`` takes every tensor when the result has ``layer_grad_sqnorm``, else the last
    Linear's (weight, bias); ``"last"`` always the last Linear's. Logs, because the norms span decades.
    """
    if layers not in ("all", "last"):
        raise InputError(f"layers must be 'all' or 'last', got {layers!r}")
    norms = result.confounding_grad_sqnorm
    if layers == "all" and result.layer_grad_sqnorm is not None:
        norms = result.layer_grad_sqnorm
    return np.log(np.asarray(norms, dtype=np.float64) + _EPS)


def gradnorm_score(result: ProbeResult, temperature: float = 1.0) -> np.ndarray:
    """GradNorm (Huang et al. 2021, METHODS.md §5) closed form, negated: -(1/T)·||h||₁·||p − u||₁."""
    z = np.asarray(result.logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = 1.0 / p.shape[1]
    return -np.abs(result.features).sum(axis=1) * np.abs(p - u).sum(axis=1) / temperature


class MLPDetector:
    """2-layer MLP (standardise -> Linear -> ReLU -> Linear) whose output logit is the OOD score."""

    kind = "mlp"

    def __init__(self, hidden: int = 32, alpha: float = 1e-3, seed: int = 0):
        self.hidden, self.alpha, self.seed = hidden, alpha, seed
        self.arrays = None

    def fit(self, features, labels=None) -> "MLPDetector":
        """``labels``: 1 for OOD, 0 for in-distribution (both needed)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        features, labels = np.asarray(features, np.float64), np.asarray(labels)
        if labels is None or labels.shape != (len(features),) or set(np.unique(labels)) != {0, 1}:
            raise InputError("MLPDetector.fit needs labels 0 (in-distribution) and 1 (OOD), one per row")
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        # L-BFGS: full-batch and deterministic, the right solver for a few thousand rows
        mlp = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=self.alpha, solver="lbfgs", max_iter=1000,
                            random_state=self.seed)
        with warnings.catch_warnings():  # a capped, deterministic fit is what we want; no need to shout
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit((features - mean) / std, labels)
        self.arrays = {"mean": mean, "std": std, "w1": mlp.coefs_[0], "b1": mlp.intercepts_[0],
                       "w2": mlp.coefs_[1][:, 0], "b2": mlp.intercepts_[1]}
        return self

    def score(self, features) -> np.ndarray:
        if self.arrays is None:
            raise NotFittedError("MLPDetector is not fitted; call fit(features, labels) first")
        a = self.arrays
        hidden = np.maximum(((np.asarray(features, np.float64) - a["mean"]) / a["std"]) @ a["w1"] + a["b1"], 0)
        return hidden @ a["w2"] + a["b2"][0]


class GaussianDetector:
    """Squared Mahalanobis distance to the in-distribution mean (Ledoit-Wolf covariance); no OOD needed."""

    kind = "gaussian"

    def __init__(self):
        self.arrays = None

    def fit(self, features, labels=None) -> "GaussianDetector":
        """``labels`` is ignored: every row is in-distribution."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, np.float64)
        estimate = LedoitWolf().fit(features)
        self.arrays = {"mean": estimate.location_, "precision": estimate.precision_}
        return self

    def score(self, features) -> np.ndarray:
        if self.arrays is None:
            raise NotFittedError("GaussianDetector is not fitted; call fit(features) first")
        centred = np.asarray(features, np.float64) - self.arrays["mean"]
        return np.einsum("bi,ij,bj->b", centred, self.arrays["precision"], centred)


_MODELS = {"mlp": MLPDetector, "gaussian": GaussianDetector}


def threshold_at_tpr(in_scores, tpr: float = 0.95) -> float:
    """The score below which a fraction ``tpr`` of in-distribution inputs fall (they are accepted)."""
    return float(np.quantile(np.asarray(in_scores, np.float64), tpr, method="higher"))


def to_npz(detector) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **detector.arrays)
    return buffer.getvalue()


def from_npz(kind: str, data: bytes):
    detector = _MODELS[kind]()
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        detector.arrays = {name: npz[name] for name in npz.files}
    return detector


@dataclass(frozen=True)
class DetectionResult:
    """``score`` [B] (higher = more anomalous) and ``is_anomalous`` [B] = score > threshold."""

    score: np.ndarray
    is_anomalous: np.ndarray
    threshold: float
    kind: str
    probe: ProbeResult

    def __len__(self) -> int:
        return len(self.score)


def _images(data, what: str) -> np.ndarray:
    if isinstance(data, tuple):  # (images, labels) as gradprobe.data returns them
        data = data[0]
    data = np.asarray(data)
    if data.ndim != 4 or len(data) < 10:
        raise InputError(f"{what} must be images [N, C, H, W] with N >= 10, got shape {list(data.shape)}")
    return data


def calibrate(probe, in_dist, ood=None, *, kind: str = "paper", tpr: float = 0.95, hidden: int = 32,
              seed: int = 0, description: dict | None = None) -> dict:
    """Fit a detector of ``kind`` and store it in ``probe``'s bundle; return its manifest section.

    ``in_dist``: in-distribution images (or ``(images, labels)``); a seeded half trains the detector,
    the other half sets the threshold at ``tpr``. ``ood``: OOD images for the supervised kinds
    ('paper', 'last-layer'), all used for training. ``description``: what the data are, stored as is.
    """
    if kind not in KINDS:
        raise InputError(f"unknown detector kind {kind!r}; expected one of {KINDS}")
    if not 0.5 <= tpr < 1:
        raise InputError(f"tpr must be in [0.5, 1), got {tpr}")
    in_images = _images(in_dist, "in_dist")
    if kind != "ood-free" and ood is None:
        raise InputError(f"kind={kind!r} trains a classifier on in-distribution and OOD images: pass ood=..., "
                         "or use kind='ood-free'")
    layers = "last" if kind == "last-layer" else "all"
    order = np.random.default_rng(seed).permutation(len(in_images))
    train, held = order[: len(order) // 2], order[len(order) // 2:]
    in_result = probe.run(in_images)
    in_features = gradient_features(in_result, layers)
    source = "layer_grad_sqnorm" if layers == "all" and in_result.layer_grad_sqnorm is not None \
        else "confounding_grad_sqnorm"
    if kind == "ood-free":
        detector, n_ood = GaussianDetector().fit(in_features[train]), 0
    else:
        ood_features = gradient_features(probe.run(_images(ood, "ood")), layers)
        n_ood = len(ood_features)
        labels = np.r_[np.zeros(len(train), int), np.ones(n_ood, int)]
        detector = MLPDetector(hidden=hidden, seed=seed).fit(np.vstack([in_features[train], ood_features]), labels)
    threshold = threshold_at_tpr(detector.score(in_features[held]), tpr)
    data = to_npz(detector)
    import hashlib

    name = f"detector-{hashlib.sha256(data).hexdigest()[:12]}.npz"
    old = probe.manifest.get(SECTION)
    section = {
        "kind": kind, "model": detector.kind, "file": name, "features": source,
        "transform": f"log(x + {_EPS:g})",
        "feature_count": int(in_features.shape[1]), "hidden": hidden if detector.kind == "mlp" else None,
        "threshold": threshold, "tpr": tpr, "score_orientation": SCORE_ORIENTATION,
        "is_anomalous": "score > threshold",
        "fit": {"in_dist_train": int(len(train)), "in_dist_threshold": int(len(held)), "ood_train": n_ood,
                "seed": seed, "data": description or {}},
    }
    remove = (old["file"],) if old and old.get("file") != name else ()
    probe.manifest = update_manifest(probe.path, SECTION, section, {name: data} if name not in
                                     probe.manifest["files"] else {}, remove=remove)
    probe._detector = None
    return section


def load_detector(probe):
    """The bundle's calibrated detector and its manifest section; NotFittedError when there is none."""
    section = probe.manifest.get(SECTION)
    if not section:
        raise NotFittedError(f"bundle {probe.path} has no calibrated detector: run probe.calibrate(in_dist, ood) "
                             f"or `gradprobe calibrate {probe.path}` first")
    cached = getattr(probe, "_detector", None)
    if cached is None or cached[0] is not section:
        if section.get("model") not in _MODELS:
            raise BundleError(f"{probe.path}: unknown detector model {section.get('model')!r}")
        detector = from_npz(section["model"], (probe.path / section["file"]).read_bytes())
        probe._detector = cached = (section, detector)
    return cached[1], section


def detect(probe, images) -> DetectionResult:
    """Score ``images`` with the bundle's detector: numpy only (ONNX Runtime runs the probe graph)."""
    detector, section = load_detector(probe)
    result = probe.run(images)
    deep = section["features"] == "layer_grad_sqnorm"
    if deep and result.layer_grad_sqnorm is None:
        raise BundleError(f"{probe.path}: the detector needs layer_grad_sqnorm, which this probe graph lacks; "
                          "re-export with gradprobe.export(..., layer_grads=True)")
    features = gradient_features(result, "all" if deep else "last")
    if features.shape[1] != section["feature_count"]:
        raise BundleError(f"{probe.path}: the detector expects {section['feature_count']} features, "
                          f"the probe graph gives {features.shape[1]}")
    score = detector.score(features)
    return DetectionResult(score=score, is_anomalous=score > section["threshold"],
                           threshold=section["threshold"], kind=section["kind"], probe=result)


def describe(section: dict) -> str:
    return json.dumps(section, indent=2)
