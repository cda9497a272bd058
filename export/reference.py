"""The research-style reference in eager PyTorch: per sample, forward, then one backward per label and map.

This is how the original research scripts compute the quantities (batch size 1, ``zero_grad`` and a full
``loss.backward()`` per label and per map, reading ``.grad``). It is the oracle of the parity tests and
engine (c) of the benchmarks; it is deliberately not clever.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _normalized(images: np.ndarray, normalize) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if normalize is None:
        return x
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
    return (x - mean) / std


def _sqnorm(grads) -> float:
    return float(sum((g.double() ** 2).sum() for g in grads))


def _map(grad: torch.Tensor, activation: torch.Tensor, sign: float = 1.0) -> np.ndarray:
    alpha = grad.mean(dim=(2, 3), keepdim=True)
    return torch.relu(sign * (alpha * activation).sum(dim=1))[0].detach().numpy()


class ResearchReference:
    """Per-sample autograd reference for a model, its target layer and its last Linear."""

    def __init__(self, model: nn.Module, target_layer: str, linear: str, normalize=None):
        self.model = model.eval()
        self.target = model.get_submodule(target_layer)
        self.linear = model.get_submodule(linear)
        self.normalize = normalize

    @classmethod
    def for_bundle(cls, model: nn.Module, manifest: dict) -> "ResearchReference":
        """The reference for ``model`` with the target layer, last Linear and normalisation of a bundle."""
        normalize = manifest["input"]["normalize"]
        return cls(model, manifest["target_layer"]["name"], manifest["head"]["linear"],
                   (normalize["mean"], normalize["std"]))

    def _forward(self, x: torch.Tensor):
        captured = {}

        def keep(_module, _inputs, output):
            captured["activation"] = output

        def keep_features(_module, inputs):
            captured["features"] = inputs[0]

        hooks = [self.target.register_forward_hook(keep), self.linear.register_forward_pre_hook(keep_features)]
        try:
            logits = self.model(x)
        finally:
            for hook in hooks:
                hook.remove()
        return logits, captured["activation"], captured["features"]

    def _backward(self, loss: torch.Tensor, activation: torch.Tensor):
        """A full ``loss.backward()`` through the network, as research scripts do; returns the gradients read."""
        self.model.zero_grad(set_to_none=True)
        activation.grad = None
        loss.backward(retain_graph=True)
        return self.linear.weight.grad, self.linear.bias.grad, activation.grad

    def run(self, images: np.ndarray, contrast=None) -> dict[str, np.ndarray]:
        """The probe outputs (same names as the ONNX graph) for every image, one at a time."""
        x_all = _normalized(images, self.normalize)
        rows = []
        for index in range(len(x_all)):
            logits, activation, features = self._forward(x_all[index:index + 1])
            activation.retain_grad()
            probs = torch.softmax(logits, dim=1)
            classes = logits.shape[1]
            pred = int(logits.argmax(1))
            ranked = torch.argsort(logits[0], descending=True)
            q = int(ranked[1]) if contrast is None or int(contrast[index]) < 0 else int(contrast[index])

            label_sq = []
            for label in range(classes):
                grad_w, grad_b, _ = self._backward(F.cross_entropy(logits, torch.tensor([label])), activation)
                label_sq.append(_sqnorm([grad_w, grad_b]))
            bce = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum")
            grad_w, grad_b, _ = self._backward(bce, activation)
            confounding = [_sqnorm([grad_w]), _sqnorm([grad_b])]

            grad_cam = self._backward(logits[0, pred], activation)[2].clone()
            grad_con = self._backward(F.cross_entropy(logits, torch.tensor([q])), activation)[2].clone()
            grad_cf = self._backward(logits[0, pred], activation)[2].clone()
            rows.append(dict(
                logits=logits[0].detach().numpy(), probs=probs[0].detach().numpy(), pred=np.int64(pred),
                features=features[0].detach().numpy(), contrast_class=np.int64(q),
                label_grad_sqnorm=np.array(label_sq, dtype=np.float64),
                confounding_grad_sqnorm=np.array(confounding, dtype=np.float64),
                cam=_map(grad_cam, activation), contrastive_cam=_map(grad_con, activation),
                counterfactual_cam=_map(grad_cf, activation, sign=-1.0)))
        self.model.zero_grad(set_to_none=True)
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
