"""Find the parts of a classifier the probe needs: its torch.fx graph, the target layer, the last Linear.

The tracer keeps torch's own layers and every subclass of a parametric torch layer (timm's ``Linear``,
``Conv2dSame``, ``BatchNormAct2d``, ``LayerNorm2d`` ...) as leaves, so each parameter tensor is owned by
exactly one call; a module whose Python code torch.fx cannot trace (shape arithmetic in ``forward``) is
made a leaf too and differentiated by the generic rule. Every activation on the path to the logits gets a
*layout*: channels-first maps, channels-last maps and token sequences on a patch grid, so that the
default target is a real spatial map whatever the model's memory layout.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from gradprobe.base.errors import ExportError

from .heads import LinearHead, PooledConvHead

#: Parametric torch layers whose subclasses stay leaves (their parameters then belong to one call).
LEAF_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.modules.batchnorm._NormBase,
              nn.LayerNorm, nn.GroupNorm, nn.Embedding)
_POOLING_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
_POOLING_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d}
#: Nodes a classifier may put after its last Linear without changing the logits (eval mode).
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)  # the same tensor as their input
_PASS_MODULES = (*_IDENTITY_MODULES, nn.Flatten)
_PASS_FUNCTIONS = {torch.flatten, F.dropout}
_PASS_METHODS = {"flatten", "view", "reshape", "contiguous", "squeeze"}
_ELEMENTWISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub}
NODE_PREFIX = "node:"


@dataclass(frozen=True)
class Layout:
    """How an activation holds a spatial map: ``nchw``, ``nhwc`` or ``tokens`` ([B, prefix + h*w, D]).

    ``tokens_cf`` is the transient [B, D, h*w] of a patch embedding before its transpose.
    """

    kind: str
    grid: tuple = ()        # (h, w) of token layouts
    prefix: int = 0         # class/distillation tokens before the grid

    def spatial(self, shape) -> tuple:
        if self.kind == "nchw":
            return tuple(shape[2:4])
        if self.kind == "nhwc":
            return tuple(shape[1:3])
        return tuple(self.grid)

    def to_map(self, value: torch.Tensor) -> torch.Tensor:
        """The activation (or its gradient) as [B, K, u, v]."""
        if self.kind == "nchw":
            return value
        if self.kind == "nhwc":
            return value.permute(0, 3, 1, 2)
        h, w = self.grid
        grid = value[:, self.prefix:self.prefix + h * w, :]
        return grid.reshape(-1, h, w, value.shape[-1]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        if self.kind in ("nchw", "nhwc"):
            return self.kind.upper()
        return f"tokens on a {self.grid[0]}x{self.grid[1]} grid after {self.prefix} prefix token(s)"


CHANNELS_FIRST = Layout("nchw")


@dataclass
class ProbeGraph:
    """A traced classifier and the nodes the probe reads: target activation A, features h, logits z."""

    module: fx.GraphModule
    target: fx.Node
    features: fx.Node
    logits: fx.Node
    target_name: str
    linear_name: str
    linear: fx.Node = None            # the last layer's call (logits may pass through Identity/Dropout after it)
    head: object = LinearHead()       # how the logits depend on the last layer (``heads``)
    layout: Layout = CHANNELS_FIRST  # how the target holds its map
    layouts: dict = field(default_factory=dict)
    batched: set = field(default_factory=set)  # nodes whose value carries the batch (depends on the images)
    chosen_by_default: bool = True
    candidates: list = field(default_factory=list)
    opaque: frozenset = frozenset()  # modules kept whole because torch.fx could not trace their code

    def __post_init__(self):
        if self.linear is None:
            self.linear = self.logits

    def _feeding_logits(self) -> set:
        reaches = {self.logits}
        for node in reversed(list(self.module.graph.nodes)):
            if any(user in reaches for user in node.users):
                reaches.add(node)
        return reaches

    def head_nodes(self) -> list[fx.Node]:
        """Nodes on a path from the target activation to the logits, in execution order."""
        depends = _after(self.module, self.target)
        reaches = self._feeding_logits()
        return [n for n in self.module.graph.nodes if n in depends and n in reaches and n is not self.target]

    def network_nodes(self) -> list[fx.Node]:
        """Every computing node the logits depend on through the images, in execution order: the whole backward."""
        reaches = self._feeding_logits()
        return [n for n in self.module.graph.nodes
                if n in reaches and n in self.batched and n.op not in ("placeholder", "get_attr")]

    def map_of(self, value: torch.Tensor) -> torch.Tensor:
        return self.layout.to_map(value)

    def with_target_module(self) -> tuple[fx.GraphModule, str]:
        """A copy of the traced model with an ``nn.Identity`` called on the target activation, so hooks
        (the autograd reference, pytorch-grad-cam) can read a target that is not a module's output."""
        module = fx.GraphModule(self.module, self.module.graph)
        graph = fx.Graph()
        mapping = {}
        name = "gradprobe_target"
        module.add_submodule(name, nn.Identity())
        for node in self.module.graph.nodes:
            mapping[node] = graph.node_copy(node, lambda n: mapping[n])
            if node is self.target:
                mapping[node] = graph.call_module(name, (mapping[node],))
        module.graph = graph
        module.recompile()
        return module, name


def describe_node(graph_module: fx.GraphModule, node: fx.Node) -> str:
    """The node with its module path, e.g. ``layer4.1.relu (ReLU)`` or ``cat_3 (cat) in inception5b``."""
    if node.op == "call_module":
        return f"{node.target} ({type(graph_module.get_submodule(node.target)).__name__})"
    what = getattr(node.target, "__name__", node.target)
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" in {list(stack)[-1]}" if stack else ""
    return f"{node.name} ({what}){inside}"


def module_path(node: fx.Node) -> str:
    """The innermost module whose forward made ``node`` ("" for the model's own forward)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


class _Tracer(fx.Tracer):
    """torch.fx tracer with subclasses of parametric layers as leaves, plus modules named in ``extra_leaves``."""

    def __init__(self, extra_leaves=(), subclass_leaves: bool = True):
        super().__init__()
        self.extra_leaves = set(extra_leaves)
        self.subclass_leaves = subclass_leaves
        self.failing = None  # the innermost module being traced when an error is raised

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if qualname in self.extra_leaves or (self.subclass_leaves and isinstance(module, LEAF_BASES)):
            return True
        return super().is_leaf_module(module, qualname)

    def call_module(self, module, forward, args, kwargs):
        qualname = self.path_of_module(module)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception:
            if self.failing is None and not self.is_leaf_module(module, qualname):
                self.failing = qualname
            raise


def _trace_graph(model: nn.Module, subclass_leaves: bool = True) -> tuple[fx.Graph, set]:
    """Trace, making the innermost module that torch.fx cannot trace a leaf, until the model traces."""
    leaves: set = set()
    while True:
        tracer = _Tracer(leaves, subclass_leaves)
        try:
            return tracer.trace(model), leaves
        except Exception as error:  # fx raises many kinds of errors on Python control flow
            if tracer.failing and tracer.failing not in leaves:
                leaves.add(tracer.failing)
                continue
            raise ExportError(f"torch.fx cannot trace {type(model).__name__}.forward: {type(error).__name__}: "
                              f"{error}. The probe graph needs a forward without Python control flow on tensor "
                              "values in the model's own code (submodules that fail are kept whole).") from error


_IN_PLACE_FUNCTIONS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                       operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu}


def _out_of_place(graph_module: fx.GraphModule) -> None:
    """Rewrite in-place calls (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.add_(y)``, ``+=``) as
    out-of-place ones: the backward rules read saved activations, which an in-place op would overwrite.
    Leaf modules are copied before the change, so the user's model is never modified."""
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            if getattr(module, "inplace", False) is True:
                replacement = copy.copy(module)
                replacement.inplace = False
                parent, _, name = str(node.target).rpartition(".")
                setattr(graph_module.get_submodule(parent), name, replacement)
        elif node.op == "call_function":
            if node.target in _IN_PLACE_FUNCTIONS:
                node.target = _IN_PLACE_FUNCTIONS[node.target]
            if node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_") \
                and hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
    graph_module.recompile()


# ------------------------------------------------------------------------------------------- layouts
def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _permutation(node: fx.Node):
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    else:
        return None
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _transposes_last_two(node: fx.Node) -> bool:
    if (node.op == "call_method" and node.target == "transpose") or \
            (node.op == "call_function" and node.target is torch.transpose):
        return sorted(d % 3 for d in node.args[1:3] if isinstance(d, int)) == [1, 2]
    return _permutation(node) == (0, 2, 1)


def _infer_layout(graph_module: fx.GraphModule, node: fx.Node, layouts: dict) -> Layout | None:
    shape = _shape(node)
    inputs = [(n, layouts.get(n), _shape(n)) for n in node.all_input_nodes]
    if shape is None:
        return None
    if len(shape) == 4:
        for _, layout, in_shape in inputs:
            permutation = _permutation(node)
            if layout is not None and permutation is not None and in_shape is not None and len(in_shape) == 4:
                if layout.kind == "nchw" and permutation == (0, 2, 3, 1):
                    return Layout("nhwc")
                if layout.kind == "nhwc" and permutation == (0, 3, 1, 2):
                    return CHANNELS_FIRST
                return None
        for _, layout, in_shape in inputs:  # same spatial dims as a laid-out input: same layout
            if layout is None or in_shape is None or len(in_shape) != 4:
                continue
            if layout.kind == "nhwc" and in_shape[:3] == shape[:3]:
                return layout
            if layout.kind == "nchw" and (in_shape[2:] == shape[2:] or in_shape[:2] == shape[:2]):
                return layout
        if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target),
                                                   (nn.Conv2d, nn.modules.batchnorm._NormBase) + _POOLING_MODULES):
            return CHANNELS_FIRST
        return None
    if len(shape) == 3:
        for source, layout, in_shape in inputs:
            if layout is None or in_shape is None:
                continue
            if len(in_shape) == 4 and layout.kind == "nchw" and shape[:2] == in_shape[:2] and \
                    shape[2] == in_shape[2] * in_shape[3]:
                return Layout("tokens_cf", (in_shape[2], in_shape[3]))
            if len(in_shape) == 4 and layout.kind == "nhwc" and shape[0] == in_shape[0] and \
                    shape[2] == in_shape[3] and shape[1] == in_shape[1] * in_shape[2]:
                return Layout("tokens", (in_shape[1], in_shape[2]))
            if layout.kind == "tokens_cf" and _transposes_last_two(node):
                return Layout("tokens", layout.grid)
            if layout.kind == "tokens" and _is_cat(node) and _cat_dim(node) == 1:
                before = 0
                for arg in node.args[0]:
                    if arg is source:
                        break
                    before += _shape(arg)[1] if _shape(arg) else 0
                return Layout("tokens", layout.grid, layout.prefix + before)
            if layout.kind == "tokens" and in_shape == shape:  # the residual stream, not q/k/v or MLP widths
                return layout
    return None


def _is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate)


def _cat_dim(node: fx.Node):
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim % len(_shape(node)) if isinstance(dim, int) and _shape(node) else None


def _layout_hint(graph_module: fx.GraphModule, user: fx.Node, node: fx.Node) -> Layout | None:
    """What a consumer says about the layout of a 4-D input: pools and convs read NCHW; a mean over
    dims (1, 2) or a permute(0, 3, 1, 2) reads NHWC (timm and torchvision Swin heads)."""
    if user.op == "call_module":
        module = graph_module.get_submodule(user.target)
        if isinstance(module, (nn.Conv2d,) + _POOLING_MODULES) and user.args[0] is node:
            return CHANNELS_FIRST
        return None
    if user.op == "call_function" and user.target in _POOLING_FUNCTIONS and user.args[0] is node:
        return CHANNELS_FIRST
    permutation = _permutation(user)
    if permutation == (0, 3, 1, 2):
        return Layout("nhwc")
    if permutation == (0, 2, 3, 1):
        return CHANNELS_FIRST
    if (user.op == "call_method" and user.target in ("mean", "amax", "sum")) or \
            (user.op == "call_function" and user.target in (torch.mean, torch.amax, torch.sum)):
        dims = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        dims = tuple(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else (dims,)) if isinstance(d, int))
        if dims == (1, 2):
            return Layout("nhwc")
        if dims == (2, 3):
            return CHANNELS_FIRST
    return None


def _layouts(graph_module: fx.GraphModule) -> tuple[dict, set]:
    """Layout of every node that holds a spatial map, and the nodes that carry the batch of images.

    Forward propagation from the images (convs and pools make NCHW, permutes switch, shape-keeping ops
    keep), then hints from consumers for 4-D tensors left unknown, spread to same-shape neighbours.
    """
    layouts, batched = {}, set()
    nodes = list(graph_module.graph.nodes)
    for node in nodes:
        if node.op == "placeholder":
            batched.add(node)
            layouts[node] = CHANNELS_FIRST
        elif node.op != "get_attr" and any(n in batched for n in node.all_input_nodes):
            batched.add(node)
    for _ in range(3):
        changed = False
        for node in nodes:
            if node in batched and node not in layouts:
                layout = _infer_layout(graph_module, node, layouts)
                if layout is not None:
                    layouts[node], changed = layout, True
        for node in nodes:
            shape = _shape(node)
            if node not in batched or node in layouts or shape is None or len(shape) != 4:
                continue
            hints = {_layout_hint(graph_module, user, node) for user in node.users} - {None}
            if len(hints) == 1:
                layouts[node], changed = hints.pop(), True
        spread = True
        while spread:  # same shape as a neighbour with a known layout: the same layout
            spread = False
            for node in nodes:
                shape = _shape(node)
                if node not in batched or node in layouts or shape is None or len(shape) != 4:
                    continue
                neighbours = [n for n in list(node.all_input_nodes) + list(node.users)
                              if n in layouts and _shape(n) == shape and layouts[n].kind in ("nchw", "nhwc")]
                kinds = {layouts[n] for n in neighbours}
                if len(kinds) == 1:
                    layouts[node], spread, changed = kinds.pop(), True, True
        if not changed:
            break
    return layouts, batched


# ---------------------------------------------------------------------------------------------- head
def _is_pass_through(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


def _is_linear(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target is F.linear


def _output_node(model: nn.Module, graph_module: fx.GraphModule) -> fx.Node:
    output = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
    if isinstance(output, (tuple, list, dict)):
        items = list(output.values() if isinstance(output, dict) else output)
        raise ExportError(f"{type(model).__name__} returns {len(items)} outputs ({type(output).__name__}); gradprobe "
                          "probes one logits tensor [B, classes]. Export a wrapper whose forward returns the main "
                          "head's logits (e.g. `lambda x: model(x)[0]` as an nn.Module), or put the model in eval "
                          "mode if the extra outputs are training-only auxiliary heads.")
    if not isinstance(output, fx.Node):
        raise ExportError(f"{type(model).__name__} must return one logits tensor [B, classes], "
                          f"not {type(output).__name__}")
    return output


class PointwiseLinear(nn.Linear):
    """A 1x1 ``Conv2d`` that reads a pooled [B, C, 1, 1] map, as the Linear it is (timm's DLA and others classify
    so), sharing the convolution's parameters (the same storage, reshaped to [O, C])."""

    def __init__(self, conv: nn.Conv2d):
        nn.Module.__init__(self)
        self.in_features, self.out_features = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().view(conv.out_channels, conv.in_channels))
        self.bias = nn.Parameter(conv.bias.detach()) if conv.bias is not None else None


def _is_pointwise_head(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module" or type(module := graph_module.get_submodule(node.target)) is not nn.Conv2d:
        return False
    shape = _shape(node.args[0]) if node.args else None
    return (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0)
            and module.dilation == (1, 1) and module.groups == 1
            and shape is not None and len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def _read_pointwise_head_as_linear(model: nn.Module, graph_module: fx.GraphModule, logits: fx.Node) -> bool:
    """Where the logits come from a 1x1 Conv2d on a 1x1 map (through flatten and the like), call it as
    flatten -> ``PointwiseLinear`` -> reshape to [B, O, 1, 1] in the traced graph (the user's model is left as
    it is). Returns whether the graph changed."""
    node = logits
    while not _is_pointwise_head(graph_module, node):
        if not _is_pass_through(graph_module, node) or not node.all_input_nodes:
            return False
        node = node.args[0]
    *parents, field = str(node.target).split(".")
    owner = graph_module
    for index, item in enumerate(parents):  # the traced copy's own containers only, never the user's modules
        owner = getattr(owner, item)
        if owner is model.get_submodule(".".join(parents[:index + 1])):
            return False
    conv = owner.get_submodule(field)
    setattr(owner, field, PointwiseLinear(conv))
    graph = graph_module.graph
    with graph.inserting_before(node):
        flat = graph.call_method("flatten", (node.args[0], 1))
        linear = graph.call_module(str(node.target), (flat,))
        restored = graph.call_method("reshape", (linear, -1, conv.out_channels, 1, 1))
    node.replace_all_uses_with(restored)
    graph.erase_node(node)
    graph_module.recompile()
    return True


def _find_linear(model: nn.Module, graph_module: fx.GraphModule, logits: fx.Node) -> tuple[fx.Node, object]:
    """The last layer's call and its head kind: an nn.Linear (or F.linear), else SqueezeNet's 1x1 Conv2d read
    through ReLU and global average pooling."""
    node = logits
    passed = []
    while not _is_linear(graph_module, node):
        if not _is_pass_through(graph_module, node) or not node.all_input_nodes:
            pooled = _pooled_conv_head(graph_module, node)
            if pooled is not None:
                return pooled
            through = f" (through {', '.join(passed)})" if passed else ""
            raise ExportError(f"the logits of {type(model).__name__} come from {describe_node(graph_module, node)}"
                              f"{through}; gradprobe needs them to come from an nn.Linear (or F.linear, or a 1x1 "
                              "Conv2d on a pooled 1x1 map, or a 1x1 Conv2d whose map is rectified and averaged), "
                              "possibly followed by Identity, Dropout or flatten")
        passed.append(describe_node(graph_module, node))
        node = node.args[0]
    shape = _shape(logits)
    if shape is None or len(shape) != 2:
        raise ExportError(f"the logits of {type(model).__name__} have shape {shape}; gradprobe needs [B, classes]")
    features = _shape(node.args[0])
    if features is None or len(features) != 2:
        raise ExportError(f"the last Linear {describe_node(graph_module, node)} reads a {features} tensor; "
                          "gradprobe needs it to read the penultimate features [B, d]")
    return node, LinearHead()


def _is_global_average(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """An average over all positions of a [B, C, H, W] map, into [B, C, 1, 1] or [B, C]."""
    if node.op == "call_module":
        average = isinstance(graph_module.get_submodule(node.target), nn.AdaptiveAvgPool2d)
    elif node.op == "call_function":
        average = node.target in (F.adaptive_avg_pool2d, torch.mean)
    else:
        average = node.op == "call_method" and node.target == "mean"
    before, after = (_shape(node.args[0]) if node.args else None), _shape(node)
    return (average and before is not None and after is not None and len(before) == 4
            and math.prod(after[1:]) == before[1] and after[1] == before[1])


def _pooled_conv_head(graph_module: fx.GraphModule, pooled: fx.Node):
    """(conv call, PooledConvHead) where ``pooled`` averages a 1x1 Conv2d's map, rectified or not; else None."""
    if not _is_global_average(graph_module, pooled) or not isinstance(pooled.args[0], fx.Node):
        return None
    node, relu = pooled.args[0], False
    if node.op in ("call_module", "call_function", "call_method") and node.all_input_nodes:
        from . import rules  # noqa: F401  (the registry knows every form of ReLU)
        from .backward import RULES
        module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        rule = RULES.find(node, module)
        if rule is not None and rule.name == "relu":
            node, relu = node.args[0], True
    if node.op != "call_module" or type(conv := graph_module.get_submodule(node.target)) is not nn.Conv2d:
        return None
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((1, 1), (1, 1), (0, 0),
                                                                                     (1, 1), 1):
        return None
    return node, PooledConvHead(relu)


def _linear_name(graph_module: fx.GraphModule, linear: fx.Node) -> str:
    if linear.op == "call_module":
        return str(linear.target)
    weight = linear.args[1] if len(linear.args) > 1 else linear.kwargs.get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return str(weight.target).rsplit(".", 1)[0] if "." in str(weight.target) else ""
    return linear.name


# -------------------------------------------------------------------------------------------- target
def _is_pooling(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return isinstance(module, _POOLING_MODULES) or type(module).__name__ in ("SelectAdaptivePool2d",)
    if node.op == "call_function":
        return node.target in _POOLING_FUNCTIONS or (node.target in (torch.mean, torch.amax) and len(node.args) > 1)
    return node.op == "call_method" and node.target in ("mean", "amax")


def _is_identity(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Identity or Dropout (eval mode): the same tensor as its input, which names the target better."""
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _IDENTITY_MODULES)
    return node.op == "call_function" and node.target is F.dropout


def _owner_module(node: fx.Node, graph_module: fx.GraphModule) -> str | None:
    """The outermost module whose output ``node`` is (its last node), or None."""
    if node.op == "call_module":
        owners = [str(node.target)]
    else:
        owners = []
    stack = list((node.meta.get("nn_module_stack") or {}).keys())
    nodes = list(graph_module.graph.nodes)
    position = nodes.index(node)
    for path in reversed(stack):
        later = [n for n in nodes[position + 1:] if path in (n.meta.get("nn_module_stack") or {})
                 or (n.op == "call_module" and (str(n.target) == path or str(n.target).startswith(path + ".")))]
        if later:
            break
        owners.append(path)
    owners = [o for o in owners if o]
    return min(owners, key=lambda o: o.count(".")) if owners else None


def _candidates(graph_module: fx.GraphModule, layouts: dict, on_path: set) -> list[fx.Node]:
    return [n for n in graph_module.graph.nodes
            if n in on_path and n.op in ("call_module", "call_function", "call_method")
            and n in layouts and layouts[n].kind in ("nchw", "nhwc", "tokens")
            and _shape(n) is not None]


def candidate_table(graph_module: fx.GraphModule, nodes, layouts: dict, limit: int = 12) -> str:
    rows = []
    for node in list(nodes)[-limit:]:
        owner = _owner_module(node, graph_module)
        name = owner or f"{NODE_PREFIX}{node.name}"
        rows.append(f"{name} {list(_shape(node))} {layouts[node].describe()}")
    return "; ".join(rows)


def _resolve(graph_module: fx.GraphModule, model: nn.Module, target_layer: str, candidates, layouts) -> fx.Node:
    names = dict(model.named_modules())
    node_names = {n.name: n for n in graph_module.graph.nodes}
    listing = candidate_table(graph_module, candidates, layouts)
    if target_layer.startswith(NODE_PREFIX) or (target_layer not in names and target_layer in node_names):
        name = target_layer[len(NODE_PREFIX):] if target_layer.startswith(NODE_PREFIX) else target_layer
        if name not in node_names:
            raise ExportError(f"target_layer {target_layer!r} names no node of the traced {type(model).__name__}; "
                              f"candidates (last spatial activations, name [shape] layout): {listing}")
        return node_names[name]
    if target_layer not in names:
        raise ExportError(f"target_layer {target_layer!r} is not a module or traced node of {type(model).__name__}; "
                          f"candidates (last spatial activations, name [shape] layout): {listing}")
    # the output of a module is the last node traced inside it (containers are traced through)
    matches = [n for n in graph_module.graph.nodes
               if target_layer in (n.meta.get("nn_module_stack") or {})
               or (n.op == "call_module" and str(n.target) == target_layer)]
    if not matches:
        raise ExportError(f"target_layer {target_layer!r} is never called in {type(model).__name__}.forward; "
                          f"candidates: {listing}")
    return matches[-1]


class _Retaining(fx.Interpreter):
    def __init__(self, module, keep):
        super().__init__(module, garbage_collect_values=False)
        self.keep = keep

    def run_node(self, node):
        value = super().run_node(node)
        if node in self.keep and isinstance(value, torch.Tensor) and value.requires_grad:
            value.retain_grad()
        return value


def _live_maps(graph_module: fx.GraphModule, example: torch.Tensor, candidates, layouts, logits,
               on_path: set) -> list[fx.Node]:
    """The candidates whose map receives a gradient from the predicted logit on the example, in order.

    A ViT's last blocks reach the logits only through the class token: their patch-token gradients are
    exactly zero and a map there would be empty. One autograd backward through the traced model says so.
    When no candidate is live, the call where the gradient stops is named (round, sign, a detach...).
    """
    interpreter = _Retaining(graph_module, on_path)
    x = example.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        interpreter.run(x)
        z = interpreter.env[logits]
        z.gather(1, z.argmax(1, keepdim=True)).sum().backward()

    def nonzero(node) -> bool:
        grad = getattr(interpreter.env.get(node), "grad", None)
        return grad is not None and bool(grad.ne(0).any())

    live = [node for node in candidates if nonzero(node) and bool(
        layouts[node].to_map(interpreter.env[node].grad).ne(0).flatten(2).any(1).any(1).any())]
    if not live:
        stops = [node for node in graph_module.graph.nodes if node in on_path and nonzero(node)
                 and node.op != "placeholder" and not any(nonzero(n) for n in node.all_input_nodes if n in on_path)]
        graph_module.zero_grad(set_to_none=True)
        if stops:
            node = stops[-1]
            path = module_path(node)
            raise ExportError(f"the gradient of the logits stops at {describe_node(graph_module, node)}"
                              f"{f' (module path {path!r})' if path else ''}: its derivative is zero (a piecewise-"
                              "constant or non-differentiable operation such as round, sign or a detach), so "
                              "every map before it would be degenerate")
        return live
    graph_module.zero_grad(set_to_none=True)
    return live


def trace(model: nn.Module, example: torch.Tensor, target_layer: str | None = None,
          grid: tuple | None = None) -> ProbeGraph:
    """Trace ``model`` with torch.fx and locate the target layer and the last Linear.

    Default target: the last activation on the path to the logits that holds a spatial map larger than
    1x1 and is not a pooling output (the last convolutional stage, as Grad-CAM uses it), in any layout.
    ``target_layer`` names a module (its output) or a traced node (``node:NAME`` or a node name that is
    not a module). ``grid`` = (h, w) reads a [B, N, D] target as tokens whose last h*w lie on a grid.
    """
    graph, opaque = _trace_graph(model)
    graph_module = fx.GraphModule(model, graph)
    _out_of_place(graph_module)
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    except Exception as error:
        raise ExportError(f"running the traced {type(model).__name__} on the example failed: "
                          f"{type(error).__name__}: {error}") from error
    logits = _output_node(model, graph_module)
    if _read_pointwise_head_as_linear(model, graph_module, logits):
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    linear, head = _find_linear(model, graph_module, logits)
    features = linear.args[0]
    layouts, batched = _layouts(graph_module)

    graph_module.gradprobe_batched = frozenset(batched)
    probe_graph = ProbeGraph(graph_module, linear, features, logits, "", _linear_name(graph_module, linear),
                             linear=linear, head=head, layouts=layouts, batched=batched, opaque=frozenset(opaque))
    reaches = probe_graph._feeding_logits()
    after_last = _after(graph_module, linear)
    on_path = (reaches & batched) - after_last  # a target lies before the last layer
    candidates = _candidates(graph_module, layouts, on_path)
    probe_graph.candidates = candidates
    if target_layer is not None:
        target = _resolve(graph_module, model, target_layer, candidates, layouts)
        layout = layouts.get(target)
        shape = _shape(target)
        if grid is not None and shape is not None and len(shape) == 3 and shape[1] >= grid[0] * grid[1]:
            layout = Layout("tokens", tuple(grid), shape[1] - grid[0] * grid[1])
        if layout is None or layout.kind not in ("nchw", "nhwc", "tokens"):
            raise ExportError(f"target layer {describe_node(graph_module, target)} outputs shape {shape}, which "
                              "is not a spatial map gradprobe recognises ([B, K, u, v], channels-last [B, u, v, K], "
                              "or tokens on a patch grid: pass grid=(h, w)); candidates: "
                              f"{candidate_table(graph_module, candidates, layouts)}")
        if target not in on_path:
            after = target in reaches and target in after_last
            raise ExportError(f"the target layer {target_layer!r} lies after the last layer "
                              f"{probe_graph.linear_name!r}; candidates: "
                              f"{candidate_table(graph_module, candidates, layouts)}" if after else
                              f"the logits do not depend on the target layer {target_layer!r}")
        spatial = layout.spatial(shape)
        if spatial[0] * spatial[1] <= 1:
            warnings.warn(f"target layer {target_layer!r} holds a {spatial[0]}x{spatial[1]} map: its explanation "
                          "maps have a single value (a post-pooling activation?)", stacklevel=3)
        name = target_layer
    else:
        spatial = [n for n in candidates if not _is_pooling(graph_module, n) and not _is_identity(graph_module, n)
                   and _spatial_size(layouts[n], _shape(n)) > 1]
        if not spatial:
            raise ExportError(f"{type(model).__name__} has no activation holding a spatial map larger than 1x1 on "
                              "the path to its logits; gradprobe explains convolutional classifiers and vision "
                              "transformers (pass target_layer and grid=(h, w) for other token layouts)")
        live = _live_maps(graph_module, example, spatial, layouts, logits, on_path)
        if not live:
            raise ExportError(f"no spatial activation of {type(model).__name__} receives a gradient from the "
                              f"predicted logit on the example (candidates: "
                              f"{candidate_table(graph_module, spatial, layouts)}); its maps would be empty")
        target = live[-1]
        layout = layouts[target]
        name = _target_name(graph_module, model, target)
    probe_graph.target, probe_graph.layout, probe_graph.target_name = target, layout, name
    probe_graph.chosen_by_default = target_layer is None
    return probe_graph


def _after(graph_module: fx.GraphModule, node: fx.Node) -> set:
    """``node`` and every node computed from it."""
    after = {node}
    for other in graph_module.graph.nodes:
        if any(arg in after for arg in other.all_input_nodes):
            after.add(other)
    return after


def _spatial_size(layout: Layout, shape) -> int:
    h, w = layout.spatial(shape)
    return h * w


def _target_name(graph_module: fx.GraphModule, model: nn.Module, node: fx.Node) -> str:
    """The outermost module whose output the node is, else the node's name (prefixed where it is also a module's)."""
    owner = _owner_module(node, graph_module)
    if owner is not None:
        return owner
    return NODE_PREFIX + node.name if node.name in dict(model.named_modules()) else node.name


def shape_of(node: fx.Node):
    return _shape(node)


ADD_FUNCTIONS = {operator.add, torch.add}
