"""Typed results of a probe run: numpy arrays named after the probe graph's outputs."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class ProbeResult:
    """One batch through the probe graph (shapes: B images, C classes, d features, u x v target map)."""

    logits: np.ndarray                   #: [B, C]
    probs: np.ndarray                    #: [B, C] softmax
    pred: np.ndarray                     #: [B] int64, argmax of the logits
    features: np.ndarray                 #: [B, d] penultimate features h
    contrast_class: np.ndarray           #: [B] int64, Q of the contrastive map
    label_grad_sqnorm: np.ndarray        #: [B, C] ||dCE(z, q)/d(W, b)||^2 of the last Linear, every q
    confounding_grad_sqnorm: np.ndarray  #: [B, 2] weight / bias gradient sq-norms, all-ones label
    cam: np.ndarray                      #: [B, u, v] raw Grad-CAM ("why P?")
    contrastive_cam: np.ndarray          #: [B, u, v] raw contrastive map ("why P, rather than Q?")
    counterfactual_cam: np.ndarray       #: [B, u, v] raw counterfactual map ("what if not P?")
    layer_grad_sqnorm: np.ndarray | None = None  #: [B, P] per-parameter-tensor sq-norms (layer_grads=True)
    class_names: list = field(default_factory=list, repr=False)

    @classmethod
    def from_outputs(cls, outputs: dict, class_names) -> "ProbeResult":
        names = {f.name for f in fields(cls)} - {"class_names"}
        return cls(**{k: v for k, v in outputs.items() if k in names}, class_names=list(class_names))

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.pred]

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class, [B]."""
        return self.probs[np.arange(len(self.pred)), self.pred]
