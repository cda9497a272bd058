"""The one table of explanation maps (docs/METHODS.md §3): each map is a scalar target, a weighting rule and a sign.

A map explains the target layer's activation A [B, K, u, v] with channel weights w_k taken from the
gradient of a scalar S at A: ``map = ReLU(sign * sum_k w_k A_k)``. This table drives the probe graph's
outputs (``ProbeModule``), the manifest (``maps``, which the SDK's results, ``explain`` and pictures
read), and the autograd reference. A new map is one entry in ``MAPS``; a new scalar or weighting rule
is one entry in ``TARGETS`` or ``WEIGHTINGS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gradprobe.base.manifest import MapSpec


@dataclass(frozen=True)
class Target:
    """A scalar S per sample: its logit gradient dS/dz in closed form (for the graph) and S itself (for autograd)."""

    logit_gradient: Callable    # (probs [B,C], pred one-hot [B,C], contrast one-hot [B,C]) -> dS/dz [B,C]
    scalar: Callable            # (logits [1,C], pred: int, contrast: int) -> S, for the autograd reference
    uses_contrast: bool


TARGETS = {
    # S = z_P, the logit of the predicted class: "why P?"
    "predicted_logit": Target(lambda probs, pred, contrast: pred,
                              lambda logits, pred, q: logits[0, pred], uses_contrast=False),
    # S = CE(z, Q) = -log p_Q, used as is (no sign flip): "why P, rather than Q?"
    "contrast_cross_entropy": Target(lambda probs, pred, contrast: probs - contrast,
                                     lambda logits, pred, q: F.cross_entropy(logits, torch.tensor([q])),
                                     uses_contrast=True),
}


def mean_gradient(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Grad-CAM: w_k = mean_uv dS/dA_k. ``grad`` may be [B, K, 1, 1] where it is constant over positions."""
    return grad.mean(dim=(2, 3), keepdim=True)


def gradcam_plus_plus(grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018) in pytorch-grad-cam's closed form from first-order gradients:
    a = g^2 / (2 g^2 + sum_uv(A) g^3 + eps), zero where g = 0; w_k = sum_uv ReLU(g) a.

    A gradient constant over positions ([B, K, 1, 1], e.g. behind global average pooling) is kept at that size:
    every term is then the same at each of the u*v positions, so the sum is u*v times one term."""
    squared = grad * grad
    denominator = 2 * squared + activation.sum(dim=(2, 3), keepdim=True) * squared * grad + 1e-6
    alpha = torch.where(grad != 0, squared / denominator, torch.zeros_like(grad))
    repeats = (activation.shape[2] * activation.shape[3]) // (grad.shape[2] * grad.shape[3])
    return (torch.relu(grad) * alpha).sum(dim=(2, 3), keepdim=True) * repeats


#: weighting rule name -> (gradient at A, A) -> channel weights [B, K, 1, 1]
WEIGHTINGS: dict[str, Callable] = {"mean_gradient": mean_gradient, "gradcam_plus_plus": gradcam_plus_plus}

#: The maps every classifier probe graph emits, in output order. ``question`` captions pictures.
MAPS = (
    MapSpec("cam", "predicted_logit", "mean_gradient", 1, "why {P}?", uses_contrast=False),
    MapSpec("contrastive_cam", "contrast_cross_entropy", "mean_gradient", 1, "why {P},\nrather than {Q}?",
            uses_contrast=True),
    MapSpec("counterfactual_cam", "predicted_logit", "mean_gradient", -1, "what if not {P}?", uses_contrast=False),
    MapSpec("gradcam_pp", "predicted_logit", "gradcam_plus_plus", 1, "why {P}?\n(Grad-CAM++)", uses_contrast=False),
)

MEANINGS = {
    "mean_gradient": "w = mean_uv dS/dA",
    "gradcam_plus_plus": "w = sum_uv ReLU(g) g^2 / (2 g^2 + sum_uv(A) g^3), g = dS/dA",
    "predicted_logit": "S = z_P",
    "contrast_cross_entropy": "S = CE(z, Q)",
}


def describe(spec: MapSpec) -> str:
    sign = "" if spec.sign > 0 else "-"
    return (f"{spec.question.replace(chr(10), ' ')}: ReLU({sign}sum_k w_k A_k), {MEANINGS[spec.weighting]}, "
            f"{MEANINGS[spec.target]}, [B, u, v]")


def check_table() -> None:
    """Every map names a known target and weighting, and its uses_contrast agrees with its target."""
    for spec in MAPS:
        if spec.target not in TARGETS or spec.weighting not in WEIGHTINGS:
            raise AssertionError(f"map {spec.name!r}: unknown target or weighting")
        if spec.uses_contrast != TARGETS[spec.target].uses_contrast:
            raise AssertionError(f"map {spec.name!r}: uses_contrast disagrees with its target")


def weighted_map(spec: MapSpec, grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """ReLU(sign * sum_k w_k A_k) [B, u, v] for the gradient ``grad`` of the map's target at ``activation``."""
    weights = WEIGHTINGS[spec.weighting](grad, activation)
    return torch.relu(spec.sign * (weights * activation).sum(dim=1))


check_table()
