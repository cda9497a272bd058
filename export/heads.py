"""The last layer: what the closed forms of METHODS §1 read from it, for each kind of classifier head.

The closed forms need, per class c, ||dz_c/dW_c||^2 and ||dz_c/db_c||^2. A Linear (z = W h + b) gives every
class the same h and 1. SqueezeNet has no Linear: z_c = mean_p ReLU(W_c . x_p + b_c), a 1x1 Conv2d whose map is
rectified and averaged, so class c reads only the positions where its own pre-activation is positive:
dz_c/dW_c = h_c = mean_p [W_c . x_p + b_c > 0] x_p and dz_c/db_c = mean_p [...] -- one feature vector per class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gradprobe.base.errors import ExportError

from .reductions import squared_sum


@dataclass(frozen=True)
class HeadTerms:
    """``features``: the h a bundle outputs, [B, d]; ``weight_sqnorm`` / ``bias_sqnorm``: ||dz_c/dW_c||^2 and
    ||dz_c/db_c||^2, [B, C] or [B, 1] where every class reads the same h."""

    features: torch.Tensor
    weight_sqnorm: torch.Tensor
    bias_sqnorm: torch.Tensor


@dataclass(frozen=True)
class LinearHead:
    """logits = W h + b (possibly through Identity, Dropout or flatten)."""

    rank_one = True  # dCE(z, i)/dW = (p - e_i) h^T: the contrastive features of METHODS §4

    def describe(self) -> str:
        return "Linear"

    def terms(self, graph, env: dict, bias: bool) -> HeadTerms:
        features = env[graph.features]
        ones = torch.ones_like(features[:, :1])
        return HeadTerms(features, squared_sum(features, start_dim=1).unsqueeze(1), ones if bias else 0 * ones)

    def check(self, graph, env: dict) -> None:
        """Nothing to check: the logits are the Linear's output by construction."""


@dataclass(frozen=True)
class PooledConvHead:
    """logits = mean over positions of ReLU(Conv2d 1x1 (x)) (``relu``) or of the convolution alone."""

    relu: bool
    rank_one = False  # each class has its own h_c: no single (p - e_i) h^T

    def describe(self) -> str:
        return f"1x1 Conv2d{' -> ReLU' if self.relu else ''} -> global average pooling"

    def per_class(self, graph, env: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """h_c [B, C, d] and the fraction of positions each class reads, [B, C]."""
        x, z = env[graph.features], env[graph.linear]
        mask = (z > 0).to(x.dtype) if self.relu else torch.ones_like(z)
        positions = z.shape[2] * z.shape[3]
        per_class = torch.einsum("bchw,bdhw->bcd", mask, x) / positions
        return per_class, mask.mean(dim=(2, 3))

    def terms(self, graph, env: dict, bias: bool) -> HeadTerms:
        per_class, fraction = self.per_class(graph, env)
        features = env[graph.features].mean(dim=(2, 3))
        return HeadTerms(features, squared_sum(per_class, start_dim=2), fraction * fraction * float(bias))

    def check(self, graph, env: dict) -> None:
        """The logits must be sum_d W_cd h_cd + b_c fraction_c: the head is what its pattern says."""
        conv = graph.module.get_submodule(graph.linear.target)
        with torch.no_grad():
            self._check(conv, graph, env)

    def _check(self, conv, graph, env: dict) -> None:
        per_class, fraction = self.per_class(graph, env)
        weight = conv.weight.reshape(conv.out_channels, -1)
        rebuilt = (per_class * weight[None]).sum(dim=2)
        if conv.bias is not None:
            rebuilt = rebuilt + fraction * conv.bias[None]
        logits = env[graph.logits]
        error = float((rebuilt - logits).abs().max() / logits.abs().max().clamp_min(1e-12))
        if error > 1e-4:
            raise ExportError(f"the logits are not {self.describe()} of {graph.linear_name!r} on the example "
                              f"(relative difference {error:.1e}); gradprobe cannot read its last layer")
