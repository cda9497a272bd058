"""Kinks: where a piecewise activation's derivative jumps, and how the oracle checks samples that sit on one.

At a ReLU whose pre-activation is ~1e-7 the derivative is 0 on one side and 1 on the other. Two engines
that compute the same float32 forward with different summation orders (ONNX Runtime's and torch's
convolutions) can round such a value to different signs; each then returns the exact one-sided derivative
of the function *it* computed, and the per-sample gradient norms of every layer before that ReLU differ by
a finite amount (0.01-0.3 % in the MobileNet case of issue 8), not by rounding error. Neither side is wrong:
the probe graph takes the side its own forward pass is on (``rules.relu_mask``), which is what autograd does
on that forward.

So the oracle (``check_sqnorms``), instead of depending on which side a given CPU rounds to, finds the
samples whose norms disagree, looks for activations at a kink in a float64 forward (within ``MARGIN`` of the
activation's RMS, or ``DRIFT`` times the float32 forward's own drift there if larger), and accepts the sample
if the reference taken on the other side of some of those kinks agrees (flips tried closest first, kept when
they bring the reference closer; up to ``MAX_KINKS``).
``kink_margin`` is what the export's verification uses to tell samples at a kink (float64 distances, in units
of ``MARGIN`` or of the float32 forward's own drift there, whichever is larger).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .parity import ABSOLUTE_FLOOR, RELATIVE

#: Pre-activations closer than this to a kink, relative to the RMS of the activation's input, are "at a kink".
MARGIN = 1e-5
#: Kinks tried per disagreeing sample. A black Fashion-MNIST background leaves a briefly trained timm ResNet-D's
#: stem max pool with 70 windows within 1e-5 of a tie in one image: with 32 tried, the sides ONNX Runtime
#: took were not found. A real error is not undone by choosing sides at near-ties, however many.
MAX_KINKS = 128
MAX_SWEEPS = 3
#: Up to this many kinks in a sample, every set of sides is searched (to first order, ``_best_flips``).
MAX_EXHAUSTIVE = 16
#: ``kink_margin`` also counts as at a kink what lies within this many times the float32 forward's own drift
#: from the float64 one (another float32 engine drifts by a similar amount, in its own direction).
DRIFT = 4.0
#: Max-pooling's kinks: a window whose two largest values are within rounding of each other routes the
#: gradient to one or the other.
MAX_POOL = "max_pool"


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
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            return MAX_POOL
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
    if target is F.max_pool2d:
        return MAX_POOL
    return None


def fine_graph(model: nn.Module) -> fx.GraphModule:
    """The model traced through every non-torch module (timm's BatchNormAct2d shows its activation)."""
    from .graph import _out_of_place, _trace_graph

    graph_module = fx.GraphModule(model, _trace_graph(model, subclass_leaves=False)[0])
    _out_of_place(graph_module)
    return graph_module


class _Sided(fx.Interpreter):
    """Runs the traced model; at the chosen elements of kinked calls, the gradient is the one of the chosen side
    of the kink: the call is differentiated at an input moved to that side, while its value stays the value at
    the actual input (continuous functions: the move changes the derivative only)."""

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
        shifted = shifted.reshape(x.shape)
        shifted = x + (shifted - x).detach()  # the values of the chosen side, the gradient of x
        probe = super().call_module(node.target, (shifted,), {}) if node.op == "call_module" else \
            _call(node, shifted, self)
        return value.detach() + probe - probe.detach()


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


def _pool_args(graph_module, node):
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return module.kernel_size, module.stride, module.padding, module.dilation
    names = ("input", "kernel_size", "stride", "padding", "dilation")
    bound = dict(zip(names, node.args), **node.kwargs)
    return bound["kernel_size"], bound.get("stride") or bound["kernel_size"], bound.get("padding", 0), \
        bound.get("dilation", 1)


def _pool_gaps(graph_module, node, x: torch.Tensor):
    """Per window, the gap between its two largest values and the flat index (in x) of the runner-up."""
    from .backward import _pair

    kernel, stride, padding, dilation = (_pair(v) for v in _pool_args(graph_module, node))
    batch, channels, height, width = x.shape
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=float("-inf"))
    index = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width).expand(batch, channels, -1, -1)
    index = F.pad(index, (padding[1], padding[1], padding[0], padding[0]), value=-1.0)
    windows = F.unfold(padded.reshape(batch * channels, 1, *padded.shape[2:]), kernel, dilation, 0, stride)
    places = F.unfold(index.reshape(batch * channels, 1, *index.shape[2:]), kernel, dilation, 0, stride)
    top, where = windows.topk(2, dim=1)
    gap = (top[:, 0] - top[:, 1]).reshape(batch, -1)
    runner_up = places.gather(1, where[:, 1:2]).reshape(batch, channels, -1).long()
    runner_up = runner_up + (torch.arange(channels) * height * width).reshape(1, channels, 1)
    gap = torch.where(torch.isfinite(gap) & (gap > 0), gap, torch.full_like(gap, float("inf")))
    return gap, top[:, 0].reshape(batch, -1), runner_up.reshape(batch, -1)


def _distances(graph_module, node, points, value: torch.Tensor):
    """Per sample: (distance to the kink / rms [B, n], kink point [B, n], flat index [B, n])."""
    flat = value.reshape(len(value), -1).double()
    rms = flat.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-30)
    if points == MAX_POOL:
        gap, top, runner_up = _pool_gaps(graph_module, node, value.double())
        return gap / rms, top, runner_up
    distances = [(flat - point).abs() / rms for point in points]
    indices = torch.arange(flat.shape[1]).expand(len(value), -1)
    return (torch.cat(distances, 1), torch.cat([torch.full_like(flat, p) for p in points], 1),
            torch.cat([indices] * len(points), 1))


def near_kinks(graph_module: fx.GraphModule, x: torch.Tensor, margin: float = MARGIN,
               rounded: fx.GraphModule | None = None):
    """For one sample [1, ...]: [(node, flat index, kink point, distance / rms)] of every element within
    ``margin`` of a kink, from a float64 forward (with ``rounded``, the float32 trace, within ``DRIFT`` times
    the float32 forward's own drift at that activation when that is larger, as ``kink_margin`` counts). For a
    max pool the element is a window's runner-up and the point its maximum: moving the runner-up above the
    point moves the gradient to it."""
    kinks, inputs = _kink_inputs(graph_module, x)
    units = _units(inputs, x, rounded, margin)
    found = []
    for node, value in inputs.items():
        if value is None:
            continue
        distance, point, index = _distances(graph_module, node, kinks[node], value)
        unit = float(np.atleast_1d(units.get(node, margin))[0])
        for position in torch.nonzero(distance[0] < unit).flatten().tolist():
            found.append((node, int(index[0, position]), float(point[0, position]), float(distance[0, position])))
    return found


def _kink_inputs(graph_module: fx.GraphModule, x: torch.Tensor) -> tuple[dict, dict]:
    """The kinked calls {node: kink points} and their inputs on ``x``."""
    kinks = _activation_kinks(graph_module)
    interpreter = _Sided(graph_module, kinks)
    with torch.no_grad():
        interpreter.run(x)
    return kinks, interpreter.inputs


def _drift(exact: torch.Tensor, rounded: torch.Tensor) -> np.ndarray:
    """Per sample, the RMS of float32 - float64 over an activation relative to the activation's RMS: the
    spread of one float32 engine's rounding there."""
    exact, rounded = exact.reshape(len(exact), -1).double(), rounded.reshape(len(rounded), -1).double()
    rms = exact.pow(2).mean(dim=1).sqrt().clamp_min(1e-30)
    return ((rounded - exact).pow(2).mean(dim=1).sqrt() / rms).numpy()


def kink_margin(graph_module: fx.GraphModule, x: torch.Tensor, rounded: fx.GraphModule | None = None) -> np.ndarray:
    """Per sample, how close its network comes to a kink, in units of the distance that counts as "at" one
    (below 1: at a kink): the smallest distance of an activation input to one of its kinks (or of a max-pool
    window's two largest values to each other), relative to that activation's RMS over the sample.

    The unit is ``MARGIN``; with ``rounded`` (the same traced model in float32, ``graph_module`` then in float64)
    it is at least ``DRIFT`` times how far the float32 forward itself is from the exact one at that activation:
    deep in a network float32 activations drift by more than ``MARGIN`` (ShuffleNetV2's last conv: 2e-5 of
    the RMS), so two float32 engines land on different sides of kinks that far away, and a float32 forward
    would not even measure the distance right."""
    kinks, inputs = _kink_inputs(graph_module, x)
    units = _units(inputs, x, rounded, MARGIN)
    margins = np.full(len(x), np.inf)
    for node, value in inputs.items():
        if not _per_sample(value, x):
            continue
        distance, _, _ = _distances(graph_module, node, kinks[node], value)
        margins = np.minimum(margins, distance.min(dim=1).values.numpy() / units.get(node, MARGIN))
    return margins


def _units(inputs: dict, x: torch.Tensor, rounded: fx.GraphModule | None, margin: float) -> dict:
    """Per kinked call, per sample: the distance that counts as "at" its kink, ``margin`` or ``DRIFT`` times
    the float32 forward's drift from the float64 one there (``rounded``: the float32 trace), the larger."""
    if rounded is None:
        return {}
    _, approximate = _kink_inputs(rounded, x.float())
    by_name = {node.name: value for node, value in approximate.items()}
    return {node: np.maximum(margin, DRIFT * _drift(value, by_name[node.name])) for node, value in inputs.items()
            if _per_sample(value, x) and _per_sample(by_name.get(node.name), x)}


def _per_sample(value, x: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == len(x)


def _grads_with_sides(graph_module, x, names, sides, loss: str) -> list[np.ndarray]:
    """Per parameter in ``names``, the flattened float64 gradient (empty where the loss does not reach it)."""
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
    return [np.zeros(0) if by_name.get(n) is None else by_name[n].double().reshape(-1).numpy() for n in names]


def _sides(kinks, choice, dtype) -> dict:
    sides = {}
    for (node, flat_index, point, _), side in zip(kinks, choice):
        indices, values = sides.get(node, ([], []))
        scale = max(abs(point), 1.0)
        sides[node] = (indices + [flat_index], values + [point + side * 1e-3 * scale])
    return {node: (torch.tensor(i), torch.tensor(v, dtype=dtype)) for node, (i, v) in sides.items()}


def sided_grads(graph_module: fx.GraphModule, x: torch.Tensor, names, kinks, choice, loss: str = "bce"):
    """Per-parameter gradients of one sample [1, ...] with the derivative at each kink of ``kinks`` (from
    ``near_kinks``) taken from the side in ``choice`` (-1 below the kink, +1 above)."""
    return _grads_with_sides(graph_module, x, names, _sides(kinks, choice, x.dtype), loss)


def sided_sqnorms(graph_module: fx.GraphModule, x: torch.Tensor, names, kinks, choice, loss: str = "bce"):
    """The squared norms of ``sided_grads``."""
    return np.array([float(g @ g) for g in sided_grads(graph_module, x, names, kinks, choice, loss)])


def _best_flips(ours: np.ndarray, base: list[np.ndarray], flipped: list[list[np.ndarray]]) -> np.ndarray:
    """The set of flips whose norms come closest to ``ours`` (worst layer), over all 2^k sets: a flip changes the
    backward signal through one element, so to first order the gradient of a set is the base gradient plus each
    flip's own change, and each layer's squared norm is a quadratic form in the flips. Returns [k] of 0/1."""
    layers = range(len(base))
    deltas = [[f[layer] - base[layer] for layer in layers] for f in flipped]
    squares = np.array([g @ g for g in base])
    linear = np.array([[base[layer] @ d[layer] for layer in layers] for d in deltas])  # [k, L]
    gram = np.array([[[a[layer] @ b[layer] for layer in layers] for b in deltas] for a in deltas])  # [k, k, L]
    best, best_error = np.zeros(len(flipped)), np.inf
    for start in range(0, 2 ** len(flipped), 4096):
        sets = (np.arange(start, min(start + 4096, 2 ** len(flipped)))[:, None] >> np.arange(len(flipped))) & 1
        sets = sets.astype(np.float64)
        norms = squares + 2 * sets @ linear + np.einsum("nj,jkl,nk->nl", sets, gram, sets)
        worst = relative_errors(ours[None], norms).max(axis=1)
        if worst.min() < best_error:
            best, best_error = sets[worst.argmin()], float(worst.min())
    return best


def _own_sides(graph_module, sample, kinks) -> list[float]:
    """+1 where the float64 forward has the kinked element above its kink point, -1 below."""
    interpreter = _Sided(graph_module, {node: None for node, _, _, _ in kinks})
    with torch.no_grad():
        interpreter.run(sample)
    return [1.0 if float(interpreter.inputs[node].reshape(-1)[index]) > point else -1.0
            for node, index, point, _ in kinks]


def _flip(choice, positions) -> list[float]:
    flipped = list(choice)
    for position in positions:
        flipped[position] = -flipped[position]
    return flipped


def relative_errors(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|ours - reference| relative to the reference, floored at ABSOLUTE_FLOOR / RELATIVE (the oracle's measure)."""
    return np.abs(ours - reference) / np.maximum(np.abs(reference), ABSOLUTE_FLOOR / RELATIVE)


def check_sqnorms(model: nn.Module, x: torch.Tensor, ours: np.ndarray, references, names, loss: str = "bce",
                  tolerance: float = RELATIVE) -> dict:
    """Compare per-sample norms ``ours`` [B, P] with references [B, P] (e.g. float32 and float64 vmap(grad));
    an element passes within ``tolerance`` of any reference. A failing sample whose float64 forward has an
    activation at a kink (``near_kinks`` with the float32 trace) is re-checked against the references taken on
    either side of each of its kinks: the set of sides closest to ours, then single flips.

    Returns {"error": worst error after the kink check, "kink_samples": samples resolved on another side,
    "unresolved": [(sample, number of kinks)]}.
    """
    per_sample = np.min([relative_errors(ours, np.asarray(ref)) for ref in references], axis=0).max(axis=1)
    failing = [int(i) for i in np.nonzero(per_sample > tolerance)[0]]
    result = {"error": float(per_sample.max(initial=0.0)), "kink_samples": 0, "unresolved": []}
    if not failing:
        return result
    import copy

    graph_module = fine_graph(copy.deepcopy(model).double().eval())
    rounded = fine_graph(copy.deepcopy(model).float().eval())
    for index in failing:
        sample = x[index:index + 1].double()
        kinks = sorted(near_kinks(graph_module, sample, rounded=rounded), key=lambda kink: kink[3])
        if not kinks or len(kinks) > MAX_KINKS:
            result["unresolved"].append((index, len(kinks)))
            continue
        choice = _own_sides(graph_module, sample, kinks)
        if len(kinks) <= MAX_EXHAUSTIVE:
            base = sided_grads(graph_module, sample, names, kinks, choice, loss)
            flipped = [sided_grads(graph_module, sample, names, kinks, _flip(choice, [j]), loss)
                       for j in range(len(kinks))]
            chosen = _best_flips(ours[index], base, flipped)
            choice = _flip(choice, np.nonzero(chosen)[0])
        errors = relative_errors(ours[index], sided_sqnorms(graph_module, sample, names, kinks, choice, loss))
        # then single flips, closest kink first, kept when they bring the reference closer over all layers
        # (the first-order search can miss where flips interact); sweeps repeat while a flip helps
        for _ in range(MAX_SWEEPS):
            if errors.max() <= tolerance:
                break
            improved = False
            for position in range(len(kinks)):
                trial = _flip(choice, [position])
                trial_errors = relative_errors(ours[index],
                                               sided_sqnorms(graph_module, sample, names, kinks, trial, loss))
                if trial_errors.sum() < errors.sum():
                    choice, errors, improved = trial, trial_errors, True
            if not improved:
                break
        best = min(per_sample[index], float(errors.max()))
        per_sample[index] = best
        if best <= tolerance:
            result["kink_samples"] += 1
        else:
            result["unresolved"].append((index, len(kinks)))
    result["error"] = float(per_sample.max(initial=0.0))
    return result
