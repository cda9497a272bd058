"""Kinks: where a piecewise activation's derivative jumps, and how the oracle checks samples that sit on one.

At a ReLU whose pre-activation is ~1e-7 the derivative is 0 on one side and 1 on the other. Two engines
that compute the same float32 forward with different summation orders (ONNX Runtime's and torch's
convolutions) can round such a value to different signs; each then returns the exact one-sided derivative
of the function *it* computed, and the per-sample gradient norms of every layer before that ReLU differ by
a finite amount (0.01-0.3 % in the MobileNet case of issue 8), not by rounding error. Neither side is wrong:
the probe graph takes the side its own forward pass is on (``rules.relu_mask``), which is what autograd does
on that forward.

So the oracle (``check_sqnorms``), instead of depending on which side a given CPU rounds to, finds the
samples whose norms disagree, looks for activations within ``MARGIN`` (relative to the activation's RMS) of
a kink in a float64 forward, and accepts the sample if the reference taken on *either* side of those kinks
agrees (every combination of sides for up to ``MAX_KINKS`` kinks). ``kink_margin`` is what the export's
verification uses to keep its inputs away from kinks.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .parity import ABSOLUTE_FLOOR, RELATIVE

#: Pre-activations closer than this to a kink, relative to the RMS of the activation's input, are "at a kink".
MARGIN = 1e-5
MAX_KINKS = 4


def kink_points(graph_module: fx.GraphModule, node: fx.Node):
    """Where the derivative of this call jumps, or None for calls without kinks (or with unknown ones)."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
            return (0.0,)
        if isinstance(module, nn.Hardtanh):  # ReLU6 too
            return (float(module.min_val), float(module.max_val))
        if isinstance(module, (nn.Hardswish, nn.Hardsigmoid)):
            return (-3.0, 3.0)
        return None
    target = node.target
    if node.op == "call_method":
        return (0.0,) if target in ("relu", "relu_") else None
    if target in (F.relu, torch.relu, F.leaky_relu, torch.relu_, F.relu_):
        return (0.0,)
    if target is F.relu6:
        return (0.0, 6.0)
    if target in (F.hardswish, F.hardsigmoid):
        return (-3.0, 3.0)
    return None


def fine_graph(model: nn.Module) -> fx.GraphModule:
    """The model traced through every non-torch module (timm's BatchNormAct2d shows its activation)."""
    from .graph import _out_of_place, _trace_graph

    graph_module = fx.GraphModule(model, _trace_graph(model, subclass_leaves=False)[0])
    _out_of_place(graph_module)
    return graph_module


class _Sided(fx.Interpreter):
    """Runs the traced model; at the chosen elements of kinked activations, the gradient is the derivative
    from the chosen side of the kink (the forward value is unchanged: these activations are continuous)."""

    def __init__(self, graph_module, kinks, sides=None):
        super().__init__(graph_module, garbage_collect_values=True)
        self.kinks, self.sides = kinks, sides or {}
        self.inputs = {}

    def run_node(self, node):
        if node not in self.kinks:
            return super().run_node(node)
        x = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
        self.inputs[node] = x.detach() if x is not None else None
        value = super().run_node(node)
        if node not in self.sides or x is None:
            return value
        flat_index, side_values = self.sides[node]
        shifted = x.detach().clone().reshape(-1)
        shifted[flat_index] = side_values
        shifted = shifted.reshape(x.shape).requires_grad_(True)
        with torch.enable_grad():
            probe = super().call_module(node.target, (shifted,), {}) if node.op == "call_module" else \
                _call(node, shifted, self)
            (derivative,) = torch.autograd.grad(probe.sum(), shifted)
        return value.detach() + (x - x.detach()) * derivative


def _call(node, x, interpreter):
    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
    args = (x,) + tuple(args[1:])
    if node.op == "call_method":
        return getattr(x, node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _activation_kinks(graph_module) -> dict:
    return {node: points for node in graph_module.graph.nodes
            if node.op in ("call_module", "call_function", "call_method")
            and (points := kink_points(graph_module, node)) is not None}


def near_kinks(graph_module: fx.GraphModule, x: torch.Tensor, margin: float = MARGIN):
    """For one sample [1, ...]: [(node, flat index, kink point, distance / rms)] of every element within
    ``margin`` of a kink, from a float64 forward."""
    kinks = _activation_kinks(graph_module)
    interpreter = _Sided(graph_module, kinks)
    with torch.no_grad():
        interpreter.run(x)
    found = []
    for node, value in interpreter.inputs.items():
        if value is None:
            continue
        flat = value.reshape(-1).double()
        rms = float(flat.pow(2).mean().sqrt()) or 1.0
        for point in kinks[node]:
            distance = (flat - point).abs() / rms
            for index in torch.nonzero(distance < margin).flatten().tolist():
                found.append((node, index, point, float(distance[index])))
    return found


def kink_margin(graph_module: fx.GraphModule, x: torch.Tensor) -> np.ndarray:
    """Per sample, the smallest distance of any activation input to one of its kinks, relative to that
    activation's RMS over the sample (inf without kinked activations)."""
    kinks = _activation_kinks(graph_module)
    interpreter = _Sided(graph_module, kinks)
    with torch.no_grad():
        interpreter.run(x)
    margins = np.full(len(x), np.inf)
    for node, value in interpreter.inputs.items():
        if value is None or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(x):
            continue
        flat = value.reshape(len(x), -1).double()
        rms = flat.pow(2).mean(dim=1).sqrt().clamp_min(1e-30)
        for point in kinks[node]:
            distance = ((flat - point).abs().min(dim=1).values / rms).numpy()
            margins = np.minimum(margins, distance)
    return margins


def _sqnorms_with_sides(graph_module, x, names, sides, loss: str) -> np.ndarray:
    params = dict(graph_module.named_parameters())
    interpreter = _Sided(graph_module, set(sides), sides)
    with torch.enable_grad():
        z = interpreter.run(x)
        if loss == "bce":
            objective = F.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="sum")
        else:
            objective = -torch.log_softmax(z, dim=1).sum()
        chosen = [params[n] for n in names if n in params]
        grads = torch.autograd.grad(objective, chosen, allow_unused=True)
    by_name = dict(zip([n for n in names if n in params], grads))
    return np.array([0.0 if by_name.get(n) is None else float(by_name[n].double().pow(2).sum()) for n in names])


def sided_sqnorms(graph_module: fx.GraphModule, x: torch.Tensor, names, kinks, choice, loss: str = "bce"):
    """Per-parameter squared gradient norms of one sample [1, ...] with the derivative at each kink of ``kinks``
    (from ``near_kinks``) taken from the side in ``choice`` (-1 below the kink, +1 above)."""
    sides = {}
    for (node, flat_index, point, _), side in zip(kinks, choice):
        indices, values = sides.get(node, ([], []))
        scale = max(abs(point), 1.0)
        sides[node] = (indices + [flat_index], values + [point + side * 1e-3 * scale])
    sides = {node: (torch.tensor(i), torch.tensor(v, dtype=x.dtype)) for node, (i, v) in sides.items()}
    return _sqnorms_with_sides(graph_module, x, names, sides, loss)


def _errors(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.abs(ours - reference) / np.maximum(np.abs(reference), ABSOLUTE_FLOOR / RELATIVE)


def check_sqnorms(model: nn.Module, x: torch.Tensor, ours: np.ndarray, references, names, loss: str = "bce",
                  tolerance: float = RELATIVE) -> dict:
    """Compare per-sample norms ``ours`` [B, P] with references [B, P] (e.g. float32 and float64 vmap(grad));
    an element passes within ``tolerance`` of any reference. A failing sample whose float64 forward has an
    activation within ``MARGIN`` of a kink is re-checked against the references on every side of its kinks.

    Returns {"error": worst error after the kink check, "kink_samples": samples resolved on another side,
    "unresolved": [(sample, number of kinks)]}.
    """
    per_sample = np.min([_errors(ours, np.asarray(ref)) for ref in references], axis=0).max(axis=1)
    failing = [int(i) for i in np.nonzero(per_sample > tolerance)[0]]
    result = {"error": float(per_sample.max(initial=0.0)), "kink_samples": 0, "unresolved": []}
    if not failing:
        return result
    import copy

    graph_module = fine_graph(copy.deepcopy(model).double().eval())
    for index in failing:
        sample = x[index:index + 1].double()
        kinks = near_kinks(graph_module, sample)
        if not kinks or len(kinks) > MAX_KINKS:
            result["unresolved"].append((index, len(kinks)))
            continue
        best = per_sample[index]
        for choice in itertools.product((-1.0, 1.0), repeat=len(kinks)):
            reference = sided_sqnorms(graph_module, sample, names, kinks, choice, loss)
            best = min(best, float(_errors(ours[index], reference).max()))
        per_sample[index] = best
        if best <= tolerance:
            result["kink_samples"] += 1
        else:
            result["unresolved"].append((index, len(kinks)))
    result["error"] = float(per_sample.max(initial=0.0))
    return result
