"""Contrastive inference at run time (METHODS.md §4): the typed result and the facade's training entry point.

``Probe.contrastive_predict(images)`` runs the bundle once: the probe graph emits r_x, the ``contrastive``
head (a second-stage MLP trained on r_x of clean images) turns it into class scores, and both the
feed-forward and the contrastive prediction come back with their probabilities. Training needs torch
(``gradprobe[export]``), running does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .base.errors import NotFittedError

HEAD = "contrastive"


@dataclass(frozen=True)
class ContrastiveResult:
    """Feed-forward (``pred``, ``probs``) and contrastive (``contrastive_pred``, ``contrastive_probs``) predictions
    of B images over C classes; ``outputs`` holds every output of the engine call."""

    pred: np.ndarray                  # [B] int64, argmax of the logits
    probs: np.ndarray                 # [B, C] softmax of the logits
    contrastive_pred: np.ndarray      # [B] int64, argmax of the second stage on r_x
    contrastive_probs: np.ndarray     # [B, C]
    class_names: tuple = ()
    outputs: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def logits(self) -> np.ndarray:
        return self.outputs["logits"]

    @property
    def contrastive_logits(self) -> np.ndarray:
        return self.outputs["contrastive_logits"]

    @property
    def confidence(self) -> np.ndarray:
        """[B] feed-forward probability of ``pred``."""
        return self.probs[np.arange(len(self)), self.pred]

    @property
    def contrastive_confidence(self) -> np.ndarray:
        """[B] second-stage probability of ``contrastive_pred``."""
        return self.contrastive_probs[np.arange(len(self)), self.contrastive_pred]

    @property
    def changed(self) -> np.ndarray:
        """[B] bool: the contrastive prediction differs from the feed-forward one."""
        return self.pred != self.contrastive_pred

    @property
    def pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.pred]

    @property
    def contrastive_pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.contrastive_pred]


def contrastive_result(result) -> ContrastiveResult:
    """The ``ContrastiveResult`` of a ``ProbeResult`` from a bundle with a trained ``contrastive`` head."""
    return ContrastiveResult(result.pred, result.probs, result["contrastive_pred"], result["contrastive_probs"],
                             tuple(result.class_names), result.as_dict())


def require_contrastive_head(probe) -> None:
    """``NotFittedError`` saying how to get there when ``probe``'s bundle has no trained contrastive head."""
    if any(head.name == HEAD for head in probe.manifest.heads):
        return
    section = probe.manifest.classifier
    train = f"`gradprobe train-contrastive {probe.path}` (or probe.train_contrastive(images, labels))"
    if section.contrastive is None:
        raise NotFittedError(f"bundle {probe.path} has no contrastive second stage and emits no contrastive "
                             "features: re-export it with gradprobe.export(model, example, path, "
                             f"contrastive='compact'), then run {train}")
    raise NotFittedError(f"bundle {probe.path} has no trained contrastive second stage: run {train}")


def train_contrastive(probe, images, labels, *, variant: str | None = None, seed: int = 0, hidden=(256, 128),
                      max_epochs: int = 30, patience: int = 4, held_out: float = 0.1, max_steps: int | None = None,
                      progress: bool = True, description: str = ""):
    """Fit the 3-layer MLP on r_x of ``images`` (clean, labelled; a seeded ``held_out`` part decides early
    stopping) and store it in ``probe``'s bundle as the ``contrastive`` head, replacing an earlier one.

    ``variant``: which r_x the bundle emits to train on (default: the first it was exported with).
    Returns the head's manifest entry; ``probe`` runs it from now on, other processes when they next load.
    """
    try:
        from gradprobe.export.contrastive import train_head
    except ImportError as error:
        raise ImportError("training the contrastive second stage needs torch: pip install 'gradprobe[export]'") \
            from error
    spec, data, _ = train_head(probe, images, labels, variant=variant, seed=seed, hidden=hidden,
                               max_epochs=max_epochs, patience=patience, held_out=held_out, max_steps=max_steps,
                               progress=progress, description=description)
    return probe.install_head(spec, data)
