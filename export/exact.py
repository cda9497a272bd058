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
    """Every output of the float64 probe module, with the tap columns of ``layer_grad_sqnorm`` completed from
    the taps by the runtime's kernels, as after ONNX Runtime (their numpy form multiplies in the inputs' dtype,
    here float64)."""
    from gradprobe import kernels

    with torch.no_grad():
        outputs = {name: value.numpy() for name, value in
                   probe(torch.from_numpy(images).double(), torch.from_numpy(contrast)).items()}
    for column, entry in enumerate(norms or ()):
        if entry.form == "tap":
            kernels.write_tap_column(outputs["layer_grad_sqnorm"], column, outputs.pop(f"tap_input_{column}"),
                                     outputs.pop(f"tap_grad_{column}"), entry.spec)
    return outputs


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
