"""``gradprobe.load(bundle)`` -> a facade over the runtime engine: ``Probe`` for classifier bundles.

A loaded probe is a snapshot of the bundle at load time (graph and detector read once, verified);
``calibrate`` updates the bundle on disk under its writer lock and this snapshot with it.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

import numpy as np

from .base.bundle import Bundle, open_and_read, update_bundle
from .base.errors import BundleError, NotFittedError
from .base.manifest import Manifest
from .results import ProbeResult

#: manifest kind -> "module:Class" of the facade that runs such bundles.
FACADES = {"classifier": "gradprobe.probe:Probe", "gradcon": "gradprobe.gradcon:GradConProbe"}


def _wanted_files(manifest: Manifest) -> list[str]:
    return manifest.graph_files() + ([manifest.detector.file] if manifest.detector else []) + \
        [head.file for head in manifest.heads]


class EngineFacade:
    """What every facade over a ``ProbeEngine`` shares: release the engine when done, as a context manager."""

    engine = None

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Probe(EngineFacade):
    """A classifier bundle: ``run`` every probe output, ``explain``, ``detect``, ``calibrate``,
    ``contrastive_predict`` (after ``train_contrastive``).

    ``backend``: a registered runtime backend (``gradprobe.runtime.backend_names()``); other keyword
    options go to it (ONNX Runtime: ``providers``, ``threads``, ``spinning``). ``max_batch``: larger
    batches run in chunks of this size.
    """

    def __init__(self, bundle: str | os.PathLike, *, backend: str = "onnxruntime", max_batch: int = 256,
                 **backend_options):
        from gradprobe.runtime import build_engine

        opened, files = open_and_read(bundle, _wanted_files)
        self.path, self.manifest = opened.path, opened.manifest
        if self.manifest.kind != "classifier":
            raise BundleError(f"{self.path} is a {self.manifest.kind!r} bundle; open it with gradprobe.load")
        self._engine_options = dict(backend=backend, max_batch=max_batch, **backend_options)
        self.engine = build_engine(self.manifest, files, bundle=opened, **self._engine_options)
        self._detector = self._read_detector(files)

    def _read_detector(self, files: dict):
        section = self.manifest.detector
        if section is None:
            return None
        from .detect import DETECTORS

        if section.kind not in DETECTORS:
            raise BundleError(f"{self.path}: unknown detector kind {section.kind!r}; known: {sorted(DETECTORS)}")
        detector = DETECTORS[section.kind].load(files[section.file], section.feature_count)
        return detector

    def __repr__(self) -> str:
        return (f"Probe({str(self.path)!r}, input={list(self.input_shape)}, classes={len(self.class_names)}, "
                f"target_layer={self.manifest.classifier.target_layer!r}, {self.engine.describe()})")

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.classifier.class_names)

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) of one image."""
        return self.manifest.input.shape

    @property
    def map_names(self) -> tuple:
        return tuple(spec.name for spec in self.manifest.classifier.maps)

    @property
    def providers(self) -> list[str]:
        return self.engine.describe().get("providers", [])

    def run(self, images, contrast=None) -> ProbeResult:
        """Every probe output for ``images`` float32 [B, C, H, W] in [0, 1].

        ``contrast``: the class Q of the contrastive map: None (runner-up), one index or name for all,
        or one per image.
        """
        from gradprobe.runtime import validate_contrast

        images = self.engine.validate(images)
        contrast = validate_contrast(contrast, len(images), self.class_names)
        return self.result(self.engine.infer(images, {"contrast": contrast}, validated=True))

    def result(self, outputs: dict) -> ProbeResult:
        return ProbeResult(outputs, tuple(self.class_names), self.map_names)

    def explain(self, images, contrast=None):
        """Every explanation map at the input size, normalised: see ``gradprobe.explain``."""
        from .explain import explain

        return explain(self, images, contrast)

    def detect(self, images):
        """Anomaly scores (higher = more anomalous) and decisions with the bundle's calibrated detector."""
        from .detect import detection_result, gradient_features

        if self._detector is None:
            raise NotFittedError(f"bundle {self.path} has no calibrated detector: run probe.calibrate(in_dist, ood) "
                                 f"or `gradprobe calibrate {self.path}` first")
        section = self.manifest.detector
        result = self.run(images)
        features = gradient_features(result, section.features)
        finite = result.finite & np.isfinite(features).all(axis=1)
        with np.errstate(invalid="ignore", over="ignore"):
            score = self._detector.score(np.where(finite[:, None], features, 0.0))
        return detection_result(score, finite, section.threshold, section.kind, result)

    def calibrate(self, in_dist, ood=None, *, kind: str = "paper", tpr: float = 0.95, seed: int = 0,
                  description: dict | None = None, **options):
        """Fit a detector on gradient features and store it in the bundle (see ``gradprobe.detect``).

        Returns the detector's manifest section. Other processes see it when they next load the bundle.
        """
        from .detect import fit_detector

        section, detector, data = fit_detector(self, in_dist, ood, kind=kind, tpr=tpr, seed=seed,
                                               description=description, **options)
        graph = [self.manifest.files[name] for name in self.manifest.graph_files()]

        def change(current: Manifest) -> Manifest:
            if [current.files.get(name) for name in current.graph_files()] != graph:  # re-exported since loaded
                raise BundleError(f"{self.path} was re-exported after this probe loaded it: the detector was fitted on "
                                  "the previous graph; load the bundle again and calibrate that")
            return dataclasses.replace(current, detector=section)

        self.manifest = update_bundle(self.path, change, {section.file: data})
        self._detector = detector
        return section

    def contrastive_predict(self, images):
        """Feed-forward and contrastive predictions with their probabilities, from one engine call (METHODS §4)."""
        from .contrastive import contrastive_result, require_contrastive_head

        require_contrastive_head(self)
        return contrastive_result(self.run(images))

    def train_contrastive(self, images, labels, **options):
        """Train the contrastive second stage on labelled clean images and store it in the bundle as a head
        (see ``gradprobe.contrastive.train_contrastive``); returns the head's manifest entry."""
        from .contrastive import train_contrastive

        return train_contrastive(self, images, labels, **options)

    def install_head(self, spec, data: bytes):
        """Put head ``spec`` (a ``HeadSpec``, graph ``data``) into the bundle under its writer lock, replacing a
        head of the same name; this probe runs it from now on (the engine is rebuilt from what is on disk)."""
        from gradprobe.runtime import build_engine

        def change(current: Manifest) -> Manifest:
            return dataclasses.replace(current, heads=(*(h for h in current.heads if h.name != spec.name), spec))

        update_bundle(self.path, change, {spec.file: data})
        opened, files = open_and_read(self.path, _wanted_files)  # a consistent snapshot, as at load
        engine = build_engine(opened.manifest, files, **self._engine_options)
        self.engine.close()
        self.engine, self.manifest = engine, opened.manifest
        self._detector = self._read_detector(files)
        return spec


def load(bundle: str | os.PathLike, **options):
    """Open a bundle written by ``gradprobe.export`` with the facade its kind needs (``Probe`` for classifiers,
    ``GradConProbe`` for GradCon anomaly detectors)."""
    kind = Bundle.open(bundle).manifest.kind
    module_name, class_name = FACADES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)(Path(bundle), **options)
