"""The registered detectors: the paper's 2-layer MLP (per-layer or last-layer features) and an OOD-free Gaussian."""
from __future__ import annotations

import warnings

import numpy as np

from gradprobe.base.errors import InputError

from .base import Detector, register_detector


@register_detector
class MLPDetector(Detector):
    """"paper": Lee & AlRegib (ICIP 2020): log per-layer gradient norms under the all-ones confounding label ->
    standardise -> Linear -> ReLU -> Linear; the output logit is the score. Trained on labelled
    in-distribution (0) and OOD (1) samples."""

    name = "paper"
    layers = "all"
    supervised = True
    arrays = {"mean": ("F",), "std": ("F",), "w1": ("F", "H"), "b1": ("H",), "w2": ("H",), "b2": (1,)}
    positive = ("std",)

    def __init__(self, hidden: int = 32, alpha: float = 1e-3, seed: int = 0):
        super().__init__(hidden=hidden, alpha=alpha, seed=seed)

    def fit(self, features, labels=None) -> "MLPDetector":
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        features = np.asarray(features, np.float64)
        labels = None if labels is None else np.asarray(labels)
        if labels is None or labels.shape != (len(features),) or set(np.unique(labels).tolist()) != {0, 1}:
            raise InputError(f"{type(self).__name__}.fit needs labels 0 (in-distribution) and 1 (OOD), one per row")
        if not np.isfinite(features).all():
            raise InputError("detector features contain NaN or Inf; fit on images the model handles")
        mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
        # L-BFGS: full-batch and deterministic, the right solver for a few thousand rows
        mlp = MLPClassifier(hidden_layer_sizes=(self.options["hidden"],), alpha=self.options["alpha"],
                            solver="lbfgs", max_iter=1000, random_state=self.options["seed"])
        with warnings.catch_warnings():  # a capped, deterministic fit is what we want; no need to shout
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp.fit((features - mean) / std, labels)
        self.fitted = {"mean": mean, "std": std, "w1": mlp.coefs_[0], "b1": mlp.intercepts_[0],
                       "w2": mlp.coefs_[1][:, 0], "b2": mlp.intercepts_[1]}
        return self

    def _score(self, features: np.ndarray) -> np.ndarray:
        a = self.fitted
        hidden = np.maximum(((features - a["mean"]) / a["std"]) @ a["w1"] + a["b1"], 0)
        return hidden @ a["w2"] + a["b2"][0]


@register_detector
class LastLayerMLPDetector(MLPDetector):
    """"last-layer": the same MLP on the last Linear's two norms only (``confounding_grad_sqnorm``)."""

    name = "last-layer"
    layers = "last"


@register_detector
class GaussianDetector(Detector):
    """"ood-free": squared Mahalanobis distance of the log gradient norms to their in-distribution Gaussian
    (Ledoit-Wolf covariance). Needs no OOD data and no guess of the norms' sign: it is two-sided."""

    name = "ood-free"
    arrays = {"mean": ("F",), "precision": ("F", "F")}

    def fit(self, features, labels=None) -> "GaussianDetector":
        """``labels`` is ignored: every row is in-distribution."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, np.float64)
        if features.ndim != 2 or len(features) < 2 or not np.isfinite(features).all():
            raise InputError(f"GaussianDetector.fit needs finite features [N >= 2, F], got {list(features.shape)}")
        estimate = LedoitWolf().fit(features)
        self.fitted = {"mean": estimate.location_, "precision": estimate.precision_}
        return self

    def _score(self, features: np.ndarray) -> np.ndarray:
        centred = features - self.fitted["mean"]
        return np.einsum("bi,ij,bj->b", centred, self.fitted["precision"], centred)
