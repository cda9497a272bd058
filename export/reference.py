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

from gradprobe.base.manifest import Manifest

from . import maps as explanation_maps


def _normalized(images: np.ndarray, normalize) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    if normalize is None:
        return x
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in normalize)
    return (x - mean) / std


def _sqnorm(grads) -> float:
    return float(sum((g.double() ** 2).sum() for g in grads if g is not None))


class ResearchReference:
    """Per-sample autograd reference for a model, its target layer and its last Linear."""

    def __init__(self, model: nn.Module, target_layer: str, linear: str, normalize=None,
                 maps=explanation_maps.MAPS, layout=None, dtype: torch.dtype = torch.float32):
        self.dtype = dtype  # float64 (with a float64 model) where float32 autograd is itself too noisy
        self.model = model.eval()
        self.target = model.get_submodule(target_layer)
        self.linear = model.get_submodule(linear)
        self.normalize = normalize
        self.maps = tuple(maps)
        self.to_map = layout.to_map if layout is not None else (lambda value: value)

    @classmethod
    def for_bundle(cls, model: nn.Module, manifest: Manifest) -> "ResearchReference":
        """The reference for ``model`` with the target layer, last Linear, normalisation and maps of a bundle.

        A target that is a plain channels-first module is hooked on the model itself; any other (a traced
        node such as a ``cat``, a channels-last or token activation) on the traced model with an Identity
        called on the target, read through the target's layout."""
        from .graph import CHANNELS_FIRST, trace

        section = manifest.classifier
        normalize = (manifest.input.mean, manifest.input.std)
        example = torch.rand((2, *manifest.input.shape), generator=torch.Generator().manual_seed(0))
        graph = trace(model, _normalized(example.numpy(), normalize), section.target_layer)
        if section.target_layer in dict(model.named_modules()) and graph.layout == CHANNELS_FIRST:
            return cls(model, section.target_layer, section.linear, normalize, section.maps)
        hooked, name = graph.with_target_module()
        return cls(hooked, name, section.linear, normalize, section.maps, graph.layout)

    def _forward(self, x: torch.Tensor):
        captured = {}

        def keep(_module, _inputs, output):
            captured["activation"] = output

        def keep_features(_module, inputs):  # a conv head's input map, averaged over positions
            captured["features"] = inputs[0].mean(dim=(2, 3)) if inputs[0].dim() == 4 else inputs[0]

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
        bias = self.linear.bias  # None for a head without one (torchvision's MaxViT)
        return self.linear.weight.grad, None if bias is None else bias.grad, activation.grad

    def last_layer_gradients(self, images: np.ndarray) -> np.ndarray:
        """dCE(z, i)/dW of the last Linear for every image and class i, [N, C, C, d]: per image, one autograd
        backward per class (the contrastive features of METHODS §4 are read off these). Only W's gradient is
        asked for, so autograd stops at the last Linear instead of running through the whole network."""
        x_all = _normalized(images, self.normalize)
        rows = []
        for index in range(len(x_all)):
            logits, _, _ = self._forward(x_all[index:index + 1])
            rows.append(np.stack([
                torch.autograd.grad(F.cross_entropy(logits, torch.tensor([label])), self.linear.weight,
                                    retain_graph=True)[0].detach().numpy() for label in range(logits.shape[1])]))
        return np.stack(rows)

    def run(self, images: np.ndarray, contrast=None) -> dict[str, np.ndarray]:
        """The probe outputs (same names as the ONNX graph) for every image, one at a time."""
        x_all = _normalized(images, self.normalize).to(self.dtype)
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

            row = dict(
                logits=logits[0].detach().numpy(), probs=probs[0].detach().numpy(), pred=np.int64(pred),
                features=features[0].detach().reshape(-1).numpy(), contrast_class=np.int64(q),
                label_grad_sqnorm=np.array(label_sq, dtype=np.float64),
                confounding_grad_sqnorm=np.array(confounding, dtype=np.float64))
            for spec in self.maps:  # one full backward per map, as the research scripts do
                scalar = explanation_maps.TARGETS[spec.target].scalar(logits, pred, q)
                grad = self.to_map(self._backward(scalar, activation)[2].clone())
                row[spec.name] = explanation_maps.weighted_map(spec, grad, self.to_map(activation.detach()))[0] \
                    .detach().numpy()
            rows.append(row)
        self.model.zero_grad(set_to_none=True)
        return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
