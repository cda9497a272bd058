"""Per-sample squared gradient norms of every parameter tensor, for the confounding label (METHODS §1, §6).

Where each norm is computed, and why:
- Linear weight/bias, BatchNorm weight/bias, conv bias: closed forms in the ONNX graph
  (||g||^2 ||x||^2, per-channel sums): the per-sample gradient is a few numbers per channel at most.
- Conv weights where the Gram form is cheaper (few positions T: late, wide layers): in the graph,
  sum((A^T A) * (G^T G)) -- no per-sample gradient is ever formed.
- Conv weights where the direct form is cheaper (early layers, large T): forming G_b in the graph
  would hold B per-sample gradients at once, so the graph only emits the taps (layer input x, output
  gradient g) and ``gradprobe.kernels`` computes the norm a few samples at a time (numpy on CPU,
  CUDA on GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradprobe.base.errors import ExportError
from gradprobe.kernels import ConvSpec, choose_form

from .backward import _pair
from .graph import ProbeGraph

CONFOUNDING_LOSSES = ("bce", "softmax")


@dataclass
class ParameterNorm:
    """How one parameter tensor's per-sample gradient norm is computed."""

    name: str           # as in model.named_parameters()
    node: fx.Node       # the call of the module owning it
    kind: str           # linear_weight, linear_bias, conv_weight, conv_bias, bn_weight, bn_bias
    form: str           # closed, gram or tap
    spec: ConvSpec | None = None


def _spec(conv: nn.Conv2d) -> ConvSpec:
    return ConvSpec(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride),
                    _pair(conv.padding), _pair(conv.dilation), conv.groups)


def plan(model: nn.Module, graph: ProbeGraph) -> list[ParameterNorm]:
    """One entry per parameter tensor in ``model.named_parameters()`` order; ExportError if unsupported."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.module.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    entries = []
    for name, _ in model.named_parameters():
        owner, attribute = name.rsplit(".", 1) if "." in name else ("", name)
        module = model.get_submodule(owner)
        nodes = calls.get(owner, [])
        if len(nodes) != 1:
            raise ExportError(f"parameter {name!r}: module {owner!r} is called {len(nodes)} times in forward; "
                              "per-sample norms need each parameterised module called exactly once")
        node = nodes[0]
        if isinstance(module, nn.Linear):
            entries.append(ParameterNorm(name, node, f"linear_{attribute}", "closed"))
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            entries.append(ParameterNorm(name, node, f"bn_{attribute}", "closed"))
        elif isinstance(module, nn.Conv2d) and attribute == "bias":
            entries.append(ParameterNorm(name, node, "conv_bias", "closed"))
        elif isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
            spec = _spec(module)
            shape = node.meta["tensor_meta"].shape
            form = "gram" if choose_form(spec, shape[2] * shape[3]) == "gram" else "tap"
            entries.append(ParameterNorm(name, node, "conv_weight", form, spec))
        else:
            raise ExportError(f"parameter {name!r} belongs to {owner!r} ({type(module).__name__}); per-sample "
                              "norms support Conv2d, Linear, BatchNorm1d/2d parameters")
    return entries


def confounding_logit_grad(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """dJ/dz for the all-ones confounding label: BCE-with-logits summed (sigmoid(z) - 1), or BCE on the
    softmax, J = -sum_c log p_c (C p - 1)."""
    if loss == "bce":
        return torch.sigmoid(logits) - 1
    if loss == "softmax":
        return logits.shape[1] * torch.softmax(logits, dim=1) - 1
    raise ExportError(f"confounding loss must be one of {CONFOUNDING_LOSSES}, got {loss!r}")


class PatchExtractor(nn.Module):
    """Input patches [B, G, patch, T] as a one-hot depthwise convolution: im2col in plain ONNX ops."""

    def __init__(self, spec: ConvSpec):
        super().__init__()
        self.spec = spec
        kh, kw = spec.kernel
        one_hot = torch.eye(kh * kw).reshape(kh * kw, 1, kh, kw).repeat(spec.in_channels, 1, 1, 1)
        self.register_buffer("one_hot", one_hot, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        patches = F.conv2d(x, self.one_hot, None, spec.stride, spec.padding, spec.dilation, spec.in_channels)
        return patches.reshape(-1, spec.groups, spec.patch_size, patches.shape[2] * patches.shape[3])


def _sqsum(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor * tensor).flatten(1).sum(dim=1)


def gram_sqnorm(patches: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """sum_{t,s} (g_t.g_s)(a_t.a_s) per sample, per group summed."""
    grads = grad.reshape(-1, groups, grad.shape[1] // groups, grad.shape[2] * grad.shape[3])
    gram_a = patches.transpose(2, 3) @ patches
    gram_g = grads.transpose(2, 3) @ grads
    return (gram_a * gram_g).flatten(1).sum(dim=1)


def closed_form_sqnorm(entry: ParameterNorm, module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    if entry.kind == "linear_weight":
        return _sqsum(grad) * _sqsum(x)
    if entry.kind in ("linear_bias", "bn_bias") and grad.dim() == 2:
        return _sqsum(grad)
    if entry.kind in ("conv_bias", "bn_bias"):
        return _sqsum(grad.sum(dim=(2, 3)))
    if entry.kind == "bn_weight":
        shape = (1, -1) + (1,) * (x.dim() - 2)
        normalized = (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var + module.eps).reshape(shape)
        per_channel = grad * normalized
        return _sqsum(per_channel.sum(dim=(2, 3)) if x.dim() == 4 else per_channel)
    raise AssertionError(entry.kind)
