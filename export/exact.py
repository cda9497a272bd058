"""The probe graph's math apart from float32 rounding: the probe module an export converts to ONNX, built and
run in float64.

A float32 graph on a deep, ill-conditioned model misses a tight bound for two reasons that look alike: a
wrong graph, or rounding that float32 autograd and ONNX Runtime's own forward share. In float64 the second
vanishes, so the same module against float64 autograd separates them (``benchmarks/zoo.py exact``, and
``tests/export/test_zoo.py``).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .graph import trace
from .pipeline import Prepared, _eval_mode, build, prepare


def probe_in_float64(model: nn.Module, example: torch.Tensor, *, layer_grads: bool = False,
                     target_layer: str | None = None):
    """(probe module, ProbeGraph, layer-norm plan) for a float64 copy of ``model``, as ``export`` builds them."""
    model = copy.deepcopy(model).double()
    example = torch.as_tensor(example).double()
    checked = prepare(model, example, None)
    prepared = Prepared(model, example, checked.mean, checked.std)  # prepare's example is float32
    with _eval_mode(model):
        graph = trace(model, prepared.normalized(), target_layer)
        probe, norms, _ = build(prepared, graph, layer_grads, "bce")
    return probe, graph, norms


def run_in_float64(probe: nn.Module, norms, images: np.ndarray, contrast: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the float64 probe module, with the tap columns of ``layer_grad_sqnorm`` (which the
    kernels finish after ONNX Runtime) completed here from the taps, per sample."""
    with torch.no_grad():
        outputs = probe(torch.from_numpy(images).double(), torch.from_numpy(contrast))
        if "layer_grad_sqnorm" in outputs:
            columns = outputs["layer_grad_sqnorm"].clone()
            for column, entry in enumerate(norms):
                if entry.form != "tap":
                    continue
                x, grad, spec = outputs.pop(f"tap_input_{column}"), outputs.pop(f"tap_grad_{column}"), entry.spec
                shape = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
                columns[:, column] = torch.stack([
                    torch.nn.grad.conv2d_weight(x[i:i + 1], shape, grad[i:i + 1], spec.stride, spec.padding,
                                                spec.dilation, spec.groups).pow(2).sum() for i in range(len(x))])
            outputs["layer_grad_sqnorm"] = columns
    return {name: value.numpy() for name, value in outputs.items()}


def references_in_float64(model: nn.Module, graph, maps, images: np.ndarray, contrast: np.ndarray) -> dict:
    """float64 autograd's logits and maps (``ResearchReference``) on the target of ``graph``, for comparing
    with ``run_in_float64``."""
    from .reference import ResearchReference

    hooked, hook_name = graph.with_target_module()
    reference = ResearchReference(copy.deepcopy(hooked).double(), hook_name, graph.linear_name, None, maps,
                                  layout=graph.layout, dtype=torch.float64).run(images, contrast)
    with torch.no_grad():
        reference["logits"] = copy.deepcopy(model).double()(torch.from_numpy(images).double()).numpy()
    return reference
