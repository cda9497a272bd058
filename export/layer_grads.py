"""Per-sample squared gradient norms of every parameter tensor, for the confounding label (METHODS §1, §6).

Where each norm is computed, and why:
- Linear weight/bias on [B, d] inputs, BatchNorm weight/bias, conv bias: closed forms in the ONNX graph
  (||g||^2 ||x||^2, per-channel sums): the per-sample gradient is a few numbers per channel at most.
- Conv weights (and Linear weights applied at every position of a map or token sequence, which are 1x1
  convolutions) where the Gram form is cheaper (few positions T: late, wide layers): in the graph,
  sum((A^T A) * (G^T G)) -- no per-sample gradient is ever formed.
- The same where the direct form is cheaper (early layers, large T): forming G_b in the graph would hold B
  per-sample gradients at once, so the graph only emits the taps (layer input x, output gradient g) and
  ``gradprobe.kernels`` computes the norm a few samples at a time (numpy on CPU, CUDA on GPU).
- Every other parameter (LayerNorm, GroupNorm, layer scales, subclasses that rewrite forward, such as
  timm's BatchNormAct2d): ``generic`` -- a vmap over samples of the call's vjp with respect to its
  parameters, traced into forward ops (``generic.per_sample_norms``).
- Parameters the logits do not use (training-only auxiliary heads): zero, in closed form.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradprobe.base.errors import ExportError
from gradprobe.kernels import ConvSpec, choose_form

from .backward import _pair, where
from .generic import parameter_closure
from .graph import ProbeGraph
from .reductions import squared_sum, staged_sum

CONFOUNDING_LOSSES = ("bce", "softmax")


@dataclass
class ParameterNorm:
    """How one parameter tensor's per-sample gradient norm is computed."""

    name: str           # as in model.named_parameters()
    node: fx.Node       # the call that uses it (None when the logits do not use it)
    kind: str           # linear_weight, linear_bias, conv_weight, conv_bias, bn_weight, bn_bias, generic, unused
    form: str           # closed, gram, tap or generic
    spec: ConvSpec | None = None
    attribute: str = ""   # the parameter as the call reads it: a state name of the module, or a get_attr target
    per_position: bool = False  # a Linear applied at every position of a map or sequence (a 1x1 convolution)
    rows: int = 1       # rows of the call's batch per image (Swin's windows folded into the batch)


def _spec(conv: nn.Conv2d) -> ConvSpec:
    return ConvSpec(conv.in_channels, conv.out_channels, _pair(conv.kernel_size), _pair(conv.stride),
                    _pair(conv.padding), _pair(conv.dilation), conv.groups)


def _exact(module: nn.Module, base: type) -> bool:
    return isinstance(module, base) and type(module).forward is base.forward


def _positions(node: fx.Node) -> int:
    shape = node.meta["tensor_meta"].shape
    positions = 1
    for size in shape[1:-1]:
        positions *= int(size)
    return positions


def _closed_form(module: nn.Module, node: fx.Node, attribute: str, name: str) -> ParameterNorm | None:
    """A closed, Gram or tap form for the parameter, or None (then it is generic)."""
    if _exact(module, nn.Linear):
        x_shape = node.args[0].meta["tensor_meta"].shape
        if len(x_shape) == 2:
            return ParameterNorm(name, node, f"linear_{attribute}", "closed", attribute=attribute)
        if attribute == "bias":
            return ParameterNorm(name, node, "linear_bias", "closed", attribute=attribute, per_position=True)
        spec = ConvSpec(module.in_features, module.out_features, (1, 1), (1, 1), (0, 0), (1, 1), 1)
        form = "gram" if choose_form(spec, _positions(node)) == "gram" else "tap"
        return ParameterNorm(name, node, "linear_weight", form, spec, attribute, per_position=True)
    if _exact(module, nn.Conv2d) and not isinstance(module.padding, str) and module.padding_mode == "zeros":
        if attribute == "bias":
            return ParameterNorm(name, node, "conv_bias", "closed", attribute=attribute)
        spec = _spec(module)
        shape = node.meta["tensor_meta"].shape
        form = "gram" if choose_form(spec, shape[2] * shape[3]) == "gram" else "tap"
        return ParameterNorm(name, node, "conv_weight", form, spec, attribute)
    if any(_exact(module, base) for base in (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_var is not None:
        return ParameterNorm(name, node, f"bn_{attribute}", "closed", attribute=attribute)
    return None


def plan(model: nn.Module, graph: ProbeGraph) -> list[ParameterNorm]:
    """One entry per parameter tensor in ``model.named_parameters()`` order; ExportError if one cannot be had."""
    graph_module = graph.module
    network = set(graph.network_nodes())
    users: dict[str, list[tuple[fx.Node, str]]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            for attribute, _ in module.named_parameters():
                users.setdefault(f"{node.target}.{attribute}", []).append((node, attribute))
        elif node in graph.batched and node.op in ("call_function", "call_method"):
            for ancestor in parameter_closure(node, graph.batched):
                if ancestor.op == "get_attr":
                    users.setdefault(str(ancestor.target), []).append((node, str(ancestor.target)))
    entries = []
    for name, _ in model.named_parameters():
        uses = users.get(name, [])
        live = [(node, attribute) for node, attribute in uses if node in network]
        if not live:
            entries.append(ParameterNorm(name, None, "unused", "closed"))
            continue
        if len({node for node, _ in live}) > 1 or len(live) > 1:
            places = ", ".join(where(graph_module, node) for node, _ in live)
            raise ExportError(f"parameter {name!r} is used {len(live)} times in forward ({places}); per-sample "
                              "norms need each parameter used by exactly one call")
        node, attribute = live[0]
        entry = None
        if node.op == "call_module":
            entry = _closed_form(graph_module.get_submodule(node.target), node, attribute, name)
        elif _expands_parameter(node, attribute):
            entry = ParameterNorm(name, node, "expanded", "closed", attribute=attribute)
        entries.append(entry or ParameterNorm(name, node, "generic", "generic", attribute=attribute))
    return entries


def _expands_parameter(node: fx.Node, attribute: str) -> bool:
    """A class token: the parameter itself expanded to the batch (``cls_token.expand(B, -1, -1)``)."""
    source = node.args[0] if node.args else None
    return node.op == "call_method" and node.target in ("expand", "expand_as") and isinstance(source, fx.Node) \
        and source.op == "get_attr" and str(source.target) == attribute


def expanded_sqnorm(parameter: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample norm of a parameter broadcast to the batch: each sample's output gradient, summed over the
    other dimensions the parameter was broadcast along."""
    dims = tuple(i for i in range(1, parameter.dim()) if parameter.shape[i] == 1 and grad.shape[i] != 1)
    return _sqsum(grad.sum(dim=dims) if dims else grad)


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
        if spec.kernel == (1, 1) and spec.stride == (1, 1) and spec.padding == (0, 0):
            return x.reshape(-1, spec.groups, spec.patch_size, x.shape[2] * x.shape[3])
        # .to: a no-op in the exported float32 graph; lets the module run in float64 (gradprobe.export.exact)
        one_hot = self.one_hot.to(x.dtype)
        patches = F.conv2d(x, one_hot, None, spec.stride, spec.padding, spec.dilation, spec.in_channels)
        return patches.reshape(-1, spec.groups, spec.patch_size, patches.shape[2] * patches.shape[3])


def as_map(value: torch.Tensor) -> torch.Tensor:
    """A Linear's input or output gradient [B, ..., d] as the [B, d, T, 1] map of the 1x1 convolution it is."""
    flat = value.reshape(value.shape[0], -1, value.shape[-1])
    return flat.transpose(1, 2).unsqueeze(-1)


def _sqsum(tensor: torch.Tensor) -> torch.Tensor:
    return squared_sum(tensor, start_dim=1)


def gram_sqnorm(patches: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """sum_{t,s} (g_t.g_s)(a_t.a_s) per sample, per group summed."""
    grads = grad.reshape(-1, groups, grad.shape[1] // groups, grad.shape[2] * grad.shape[3])
    gram_a = patches.transpose(2, 3) @ patches
    gram_g = grads.transpose(2, 3) @ grads
    return staged_sum(gram_a * gram_g, start_dim=1)


def closed_form_sqnorm(entry: ParameterNorm, module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    if entry.kind == "linear_weight":
        return _sqsum(grad) * _sqsum(x)
    if entry.kind == "linear_bias" and entry.per_position:
        return _sqsum(grad.reshape(grad.shape[0], -1, grad.shape[-1]).sum(dim=1))
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
