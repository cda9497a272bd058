"""Typed results of a probe run: every graph output by name, with the common ones as attributes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class ProbeResult:
    """One batch through the probe graph (B images, C classes, d features, u x v target map, P parameters).

    ``result["name"]`` or ``result.name`` gives any output; the maps (``cam``, ``contrastive_cam``, ...,
    as the bundle's manifest lists them) are also in ``result.maps``.
    """

    outputs: Mapping[str, np.ndarray]
    class_names: tuple = field(default=(), repr=False)
    map_names: tuple = field(default=(), repr=False)

    def __post_init__(self):
        object.__setattr__(self, "outputs", dict(self.outputs))

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]

    def __getattr__(self, name: str):
        outputs = self.__dict__.get("outputs", {})
        if name in outputs:
            return outputs[name]
        raise AttributeError(f"ProbeResult has no output {name!r}; outputs: {list(outputs)}")

    def __len__(self) -> int:
        return len(self.outputs["pred"])

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.outputs)

    @property
    def logits(self) -> np.ndarray:
        """[B, C] z = W h + b."""
        return self.outputs["logits"]

    @property
    def probs(self) -> np.ndarray:
        """[B, C] softmax(z)."""
        return self.outputs["probs"]

    @property
    def pred(self) -> np.ndarray:
        """[B] int64, argmax of the logits."""
        return self.outputs["pred"]

    @property
    def features(self) -> np.ndarray:
        """[B, d] penultimate features h."""
        return self.outputs["features"]

    @property
    def layer_grad_sqnorm(self) -> np.ndarray | None:
        """[B, P] per-parameter-tensor gradient sq-norms, or None for bundles exported without layer_grads."""
        return self.outputs.get("layer_grad_sqnorm")

    @property
    def maps(self) -> dict[str, np.ndarray]:
        """Raw maps at the target layer, [B, u, v] each, by name."""
        return {name: self.outputs[name] for name in self.map_names}

    @property
    def pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.pred]

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class, [B]."""
        return self.probs[np.arange(len(self.pred)), self.pred]

    @property
    def finite(self) -> np.ndarray:
        """[B] bool: every float output of the sample is finite (False flags an input the model cannot handle)."""
        masks = [np.isfinite(value.reshape(len(value), -1)).all(axis=1)
                 for value in self.outputs.values() if value.dtype.kind == "f"]
        return np.logical_and.reduce(masks) if masks else np.ones(len(self), bool)
