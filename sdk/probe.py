"""``gradprobe.load(bundle)`` -> ``Probe``: run the probe graph on numpy batches, no torch needed."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle import PROBE, read_manifest
from .errors import BundleError, InputError
from .results import ProbeResult


class Probe:
    """A loaded bundle. ``run`` validates inputs once, splits large batches, and joins the outputs."""

    def __init__(self, bundle: str | os.PathLike, *, providers=None, max_batch: int = 256,
                 threads: int | None = None, spinning: bool = True):
        from gradprobe.runtime import make_backend

        if not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.path = Path(bundle)
        self.manifest = read_manifest(self.path)
        self.class_names = list(self.manifest["class_names"])
        self.input_shape = tuple(self.manifest["input"]["shape"][1:])
        self.max_batch = max_batch
        self.backend = make_backend(self.path / PROBE, providers, threads=threads, spinning=spinning)
        declared = list(self.manifest["outputs"])
        if self.backend.input_names != ["images", "contrast"] or self.backend.output_names[:len(declared)] != declared:
            raise BundleError(f"{self.path / PROBE} is not the probe graph its manifest describes: inputs "
                              f"{self.backend.input_names}, outputs {self.backend.output_names}")

    def __repr__(self) -> str:
        return (f"Probe({str(self.path)!r}, input={list(self.input_shape)}, classes={len(self.class_names)}, "
                f"target_layer={self.manifest['target_layer']['name']!r}, providers={self.backend.providers})")

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def run(self, images, contrast=None) -> ProbeResult:
        """Every probe output for ``images`` float32 [B, C, H, W] in [0, 1].

        ``contrast``: the class Q of the contrastive map: None (runner-up), one index or name for all,
        or one per image.
        """
        from gradprobe.runtime import validate_contrast, validate_images

        images = validate_images(images, self.input_shape)
        contrast = validate_contrast(contrast, len(images), self.class_names)
        chunks = []
        for start in range(0, len(images), self.max_batch):
            stop = start + self.max_batch
            outputs = self.backend.run({"images": images[start:stop], "contrast": contrast[start:stop]})
            chunks.append(_complete_layer_grads(outputs, self.manifest.get("layer_grads")))
        outputs = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
        return ProbeResult.from_outputs(outputs, self.class_names)

    def explain(self, images, contrast=None):
        """Grad-CAM, contrastive and counterfactual maps at the input size: see ``gradprobe.explain``."""
        from .explain import explain

        return explain(self, images, contrast)

    def calibrate(self, in_dist, ood=None, *, kind: str = "paper", **options):
        """Fit a detector on gradient features and store it in the bundle: see ``gradprobe.detect``."""
        from .detect import calibrate

        return calibrate(self, in_dist, ood, kind=kind, **options)

    def detect(self, images):
        """Anomaly scores (higher = more anomalous) with the bundle's calibrated detector."""
        from .detect import detect

        return detect(self, images)


def _complete_layer_grads(outputs: dict, layer_grads: dict | None) -> dict:
    """Fill the conv-weight norms the graph left to the kernels (direct form, from the taps), drop the taps."""
    if not layer_grads:
        return outputs
    from gradprobe.kernels import ConvSpec, conv_weight_sqnorm

    for tap in layer_grads["taps"]:
        x, grad = outputs.pop(tap["input"]), outputs.pop(tap["grad"])
        spec = ConvSpec.from_dict(tap["conv"])
        outputs["layer_grad_sqnorm"][:, tap["column"]] = conv_weight_sqnorm(x, grad, spec, form="direct")
    return outputs


def load(bundle: str | os.PathLike, *, providers=None, **options) -> Probe:
    """Open a bundle written by ``gradprobe.export``; ``providers`` as in ONNX Runtime (default CPU)."""
    return Probe(bundle, providers=providers, **options)
