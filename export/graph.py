"""Find the parts of a classifier the probe needs: its torch.fx graph, the target layer, the last Linear."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from gradprobe.base.errors import ExportError

_POOLING_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_POOLING_FUNCTIONS = {torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.avg_pool2d,
                      torch.nn.functional.max_pool2d, torch.nn.functional.adaptive_max_pool2d}


@dataclass
class ProbeGraph:
    """A traced classifier and the nodes the probe reads: target activation A, features h, logits z."""

    module: fx.GraphModule
    target: fx.Node
    features: fx.Node
    logits: fx.Node
    target_name: str
    linear_name: str

    def _feeding_logits(self) -> set:
        reaches = {self.logits}
        for node in reversed(list(self.module.graph.nodes)):
            if any(user in reaches for user in node.users):
                reaches.add(node)
        return reaches

    def head_nodes(self) -> list[fx.Node]:
        """Nodes on a path from the target activation to the logits, in execution order."""
        depends = {self.target}
        for node in self.module.graph.nodes:
            if any(arg in depends for arg in node.all_input_nodes):
                depends.add(node)
        reaches = self._feeding_logits()
        return [n for n in self.module.graph.nodes if n in depends and n in reaches and n is not self.target]

    def network_nodes(self) -> list[fx.Node]:
        """Every computing node the logits depend on, in execution order: the whole backward pass."""
        reaches = self._feeding_logits()
        return [n for n in self.module.graph.nodes if n in reaches and n.op not in ("placeholder", "get_attr")]


def _is_pooling(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _POOLING_MODULES)
    if node.op == "call_function":
        return node.target in _POOLING_FUNCTIONS
    return node.op == "call_method" and node.target == "mean"


def _describe(graph_module: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(graph_module.get_submodule(node.target)).__name__})"
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def trace(model: nn.Module, example: torch.Tensor, target_layer: str | None = None) -> ProbeGraph:
    """Trace ``model`` with torch.fx and locate the target layer and the last Linear.

    Default target: the last 4-D activation that is not a pooling output (the output of the last
    convolutional stage, as Grad-CAM uses it). ``target_layer`` names a module instead.
    """
    names = dict(model.named_modules())
    if target_layer is not None and target_layer not in names:
        candidates = [n for n in names if n][-8:]
        raise ExportError(f"target_layer {target_layer!r} is not a module of {type(model).__name__}; "
                          f"module names look like {candidates}")
    try:
        graph = fx.Tracer().trace(model)
    except Exception as error:  # fx raises many kinds of errors on data-dependent control flow
        raise ExportError(f"torch.fx cannot trace {type(model).__name__}: {error}. The probe graph needs a "
                          "model without data-dependent Python control flow.") from error
    graph_module = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example)

    outputs = [n for n in graph_module.graph.nodes if n.op == "output"]
    logits = outputs[0].args[0]
    if not isinstance(logits, fx.Node):
        raise ExportError(f"{type(model).__name__} must return one logits tensor [B, classes], "
                          f"not {type(logits).__name__}")
    if logits.op != "call_module" or not isinstance(graph_module.get_submodule(logits.target), nn.Linear):
        raise ExportError(f"the logits of {type(model).__name__} come from {_describe(graph_module, logits)}; "
                          "gradprobe needs them to come straight from an nn.Linear layer (the head's last Linear)")
    features = logits.args[0]

    if target_layer is not None:
        # the output of a module is the last node traced inside it (containers are traced through)
        matches = [n for n in graph_module.graph.nodes if target_layer in (n.meta.get("nn_module_stack") or {})]
        if not matches:
            raise ExportError(f"target_layer {target_layer!r} is never called in {type(model).__name__}.forward")
        target = matches[-1]
    else:
        spatial = [n for n in graph_module.graph.nodes
                   if n.op in ("call_module", "call_function", "call_method")
                   and _shape(n) is not None and len(_shape(n)) == 4 and not _is_pooling(graph_module, n)]
        if not spatial:
            raise ExportError(f"{type(model).__name__} has no 4-D activation to use as the target layer; "
                              "gradprobe explains convolutional classifiers")
        target = spatial[-1]
    if len(_shape(target) or ()) != 4:
        raise ExportError(f"target layer {_describe(graph_module, target)} outputs shape "
                          f"{tuple(_shape(target) or ())}; a [B, K, u, v] activation is needed")
    probe_graph = ProbeGraph(graph_module, target, features, logits,
                             target_name=target_layer or (target.target if target.op == "call_module" else target.name),
                             linear_name=logits.target)
    if logits not in probe_graph.head_nodes():
        raise ExportError(f"the logits do not depend on the target layer {probe_graph.target_name!r}")
    return probe_graph


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


ADD_FUNCTIONS = {operator.add, torch.add}
