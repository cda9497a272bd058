"""``gradprobe.load(bundle)`` for GradCon bundles (METHODS.md §2): one engine computes every score.

The graph gives, per image, the reconstruction loss L, the cosine between each decoder weight's gradient
of L and its training reference, and the anomaly ``score`` = L − β·mean cos. That is the negation of the
paper's normality score s = −L + β·mean cos, so that, as for every gradprobe detector, **higher means
more anomalous**; ``normality`` is s itself. ``detect`` compares the score with the bundle's threshold,
set by ``calibrate`` (on normal images alone, or on labelled normal and anomalous ones).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np

from .base.bundle import open_and_read, update_bundle
from .base.errors import BundleError, InputError, NotFittedError
from .base.manifest import GradConSection
from .detect.calibrate import DetectionResult, _images, detection_result, threshold_at_tpr, threshold_max_f1
from .probe import EngineFacade


@dataclass(frozen=True)
class GradConResult:
    """Per image: ``score`` (higher = more anomalous), ``normality`` (= −score, the paper's s),
    ``recon_loss`` and ``cosine`` [B, decoder weights]."""

    score: np.ndarray
    normality: np.ndarray
    recon_loss: np.ndarray
    cosine: np.ndarray

    def __len__(self) -> int:
        return len(self.score)

    @property
    def finite(self) -> np.ndarray:
        """[B] True where every output of the image is finite."""
        return (np.isfinite(self.score) & np.isfinite(self.normality) & np.isfinite(self.recon_loss)
                & np.isfinite(self.cosine).all(axis=1))


class GradConProbe(EngineFacade):
    """A GradCon bundle: ``run`` the score graph, ``detect`` anomalies, ``calibrate`` the threshold.

    ``backend`` and its options as for ``gradprobe.load`` (ONNX Runtime: ``providers``, ``threads``,
    ``spinning``); ``max_batch``: larger batches run in chunks of this size.
    """

    def __init__(self, bundle: str | os.PathLike, *, backend: str = "onnxruntime", max_batch: int = 256,
                 **backend_options):
        from gradprobe.runtime import build_engine

        opened, files = open_and_read(bundle, lambda manifest: manifest.graph_files())
        self.path, self.manifest = opened.path, opened.manifest
        if self.manifest.kind != "gradcon":
            raise BundleError(f"{self.path} is a {self.manifest.kind!r} bundle; open it with gradprobe.load")
        self.engine = build_engine(self.manifest, files, backend, max_batch=max_batch, bundle=opened,
                                   **backend_options)

    def __repr__(self) -> str:
        threshold = "not calibrated" if self.threshold is None else f"threshold={self.threshold:.4g}"
        return (f"GradConProbe({str(self.path)!r}, input={list(self.input_shape)}, beta={self.section.beta}, "
                f"{threshold}, {self.engine.describe()})")

    @property
    def section(self) -> GradConSection:
        return self.manifest.gradcon

    @property
    def threshold(self) -> float | None:
        return self.section.threshold

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return self.manifest.input.shape

    def run(self, images) -> GradConResult:
        """Every output for ``images`` float32 [B, C, 28, 28] in [0, 1]."""
        outputs = self.engine.infer(images)
        return GradConResult(**{name: outputs[name] for name in ("score", "normality", "recon_loss", "cosine")})

    def detect(self, images) -> DetectionResult:
        """Scores (higher = more anomalous), the calibrated threshold and the decisions (score > threshold,
        or outputs not finite); ``probe`` holds the ``GradConResult``."""
        if self.threshold is None:
            raise NotFittedError(f"bundle {self.path} has no calibrated threshold: run "
                                 "probe.calibrate(normal_images[, anomalous_images]) first")
        result = self.run(images)
        return detection_result(result.score.astype(np.float64), result.finite, self.threshold, "gradcon", result)

    def calibrate(self, normal, anomalous=None, *, tpr: float = 0.95, description: dict | None = None):
        """Set the threshold and store it in the bundle; returns the new ``gradcon`` section.

        With ``anomalous`` images: the threshold of highest F1 (normal images positive, as the GPND protocol
        of the paper). Without: the score below which a fraction ``tpr`` of ``normal`` images fall.
        Other processes see it when they next load the bundle.
        """
        normal = _images(normal, "normal")
        if anomalous is None and (isinstance(tpr, bool) or not isinstance(tpr, (int, float)) or not 0.5 <= tpr < 1):
            raise InputError(f"tpr must be in [0.5, 1), got {tpr!r}")
        scores = self.run(normal).score.astype(np.float64)
        if not np.isfinite(scores).any():
            raise InputError("no normal image gives a finite score; calibrate with images the model can handle")
        calibration = {"normal": int(len(normal)), "data": description or {}}
        if anomalous is None:
            threshold = threshold_at_tpr(scores[np.isfinite(scores)], tpr)
            calibration.update(rule="tpr", tpr=float(tpr))
        else:
            anomalous = _images(anomalous, "anomalous", minimum=1)
            other = self.run(anomalous).score.astype(np.float64)
            both, labels = np.r_[scores, other], np.r_[np.zeros(len(scores), bool), np.ones(len(other), bool)]
            keep = np.isfinite(both)
            threshold = threshold_max_f1(both[keep], labels[keep])
            calibration.update(rule="max_f1", anomalous=int(len(anomalous)))
        self.manifest = update_bundle(self.path, lambda current: dataclasses.replace(
            current, section=dataclasses.replace(current.gradcon, threshold=float(threshold),
                                                 calibration=calibration)))
        return self.section

