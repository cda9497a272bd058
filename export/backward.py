"""The backward pass of a traced classifier as ordinary forward ops: a registry of rules, and the engine.

Each rule maps the gradient of a call's output to the gradients of its inputs (a vector-Jacobian
product) for eval mode: BatchNorm uses its running statistics and Dropout is the identity. The rules only
ever see one batch of independent samples, so the batched backward of per-sample cotangents gives every
sample's own activation gradient.

Rules are registered objects keyed by module type, function and method name, so one rule serves
``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()`` (``register`` below; the rules live in
``rules.py``). A call no rule accepts gets the generic rule (``generic.py``): its vector-Jacobian product
is derived by autograd and traced into aten forward ops at export, so every differentiable call exports.
Hand rules are the fast paths (and the ones TensorRT's parser is sure to take); ``supported_operations``
lists them for errors and the README.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from gradprobe.base.errors import ExportError

from .graph import ProbeGraph, describe_node, module_path


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@dataclass
class Call:
    """One traced call as a rule sees it: the module (or None), arguments with node values filled in, output."""

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    output: Any
    inputs: list        # the tensor-valued input nodes, in order of first appearance
    values: dict        # input node -> value
    batched: set = frozenset()  # nodes that carry the batch of images

    @property
    def x(self) -> torch.Tensor:
        """The first tensor argument (the input of a layer, ``self`` of a method)."""
        return self.values[self.inputs[0]]

    def option(self, name: str, index: int | None = None, default=None):
        """A setting read the same way for a module (its attribute), a function (keyword or position) and a
        method (keyword or position, ``self`` at 0)."""
        if self.module is not None:
            return getattr(self.module, name, default)
        if name in self.kwargs:
            return self.kwargs[name]
        if index is not None and index < len(self.args):
            return self.args[index]
        return default

    def value(self, node) -> Any:
        return self.values[node] if isinstance(node, fx.Node) else node


@dataclass(frozen=True)
class Rule:
    """A hand-written backward for a set of modules, functions and methods.

    ``backward(call, grad)`` returns the gradient of ``call.inputs[0]``, or a dict {input node: gradient}.
    ``accepts(call)`` says whether this configuration is covered (else the generic rule takes it).
    """

    name: str
    backward: Callable
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    accepts: Callable | None = None
    note: str = ""
    takes_tuples: bool = False  # routes a gradient to an argument that is a tuple of tensors (``torch.cat(parts)``)


@dataclass
class Registry:
    """Rules keyed by module type (exact type, or a subclass that keeps the base class's forward), function
    object and method name."""

    rules: list = field(default_factory=list)
    by_module: dict = field(default_factory=dict)
    by_function: dict = field(default_factory=dict)
    by_method: dict = field(default_factory=dict)

    def add(self, rule: Rule) -> Rule:
        for key, table in ((rule.modules, self.by_module), (rule.functions, self.by_function),
                           (rule.methods, self.by_method)):
            for item in key:
                if item in table:
                    raise ValueError(f"{item!r} already has the backward rule {table[item].name!r}")
                table[item] = rule
        self.rules.append(rule)
        return rule

    def find(self, node: fx.Node, module: nn.Module | None) -> Rule | None:
        if node.op == "call_module":
            for base in type(module).__mro__:
                rule = self.by_module.get(base)
                if rule is not None:
                    # a subclass that rewrites forward (timm's Conv2dSame, BatchNormAct2d) is not the base layer
                    return rule if type(module).forward is base.forward else None
            return None
        if node.op == "call_function":
            try:
                return self.by_function.get(node.target)
            except TypeError:  # unhashable target
                return None
        if node.op == "call_method":
            return self.by_method.get(node.target)
        return None


RULES = Registry()


def register(name: str, *, modules=(), functions=(), methods=(), accepts=None, note: str = "",
             takes_tuples: bool = False):
    """Decorator: register ``backward(call, grad)`` as the rule for these modules, functions and methods."""
    def decorate(backward):
        RULES.add(Rule(name, backward, tuple(modules), tuple(functions), tuple(methods), accepts, note,
                       takes_tuples))
        return backward
    return decorate


def supported_operations(markdown: bool = False) -> str:
    """The operations with a hand-written backward rule, generated from the registry."""
    from . import rules  # noqa: F401  (registers the rules)

    lines = []
    for rule in RULES.rules:
        forms = [t.__name__ for t in rule.modules]
        forms += [_function_name(f) for f in rule.functions]
        forms += [f".{m}()" for m in rule.methods]
        note = f" ({rule.note})" if rule.note else ""
        lines.append(f"{rule.name}{note}: {', '.join(forms)}")
    if markdown:
        return "\n".join(f"- {line}" for line in lines)
    return "; ".join(lines)


def _function_name(function) -> str:
    import torch.nn.functional as F

    name = getattr(function, "__name__", repr(function))
    if getattr(function, "__module__", "") == "_operator":
        return f"operator.{name}"
    if getattr(F, name, None) is function:
        return f"F.{name}"
    return f"torch.{name}" if getattr(torch, name, None) is function else name


# --------------------------------------------------------------------------------------------- calls
def tensor_inputs(node: fx.Node, env: dict) -> list[fx.Node]:
    seen = []
    for arg in node.all_input_nodes:
        if isinstance(env.get(arg), torch.Tensor) and arg not in seen:
            seen.append(arg)
    return seen


def make_call(graph_module: fx.GraphModule, node: fx.Node, env: dict) -> Call:
    module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    inputs = tensor_inputs(node, env)
    return Call(node, module, args, kwargs, env[node], inputs, {n: env[n] for n in node.all_input_nodes},
                getattr(graph_module, "gradprobe_batched", frozenset()))


def where(graph_module: fx.GraphModule, node: fx.Node) -> str:
    path = module_path(node)
    return f"{describe_node(graph_module, node)}" + (f" (module path {path!r})" if path and node.op != "call_module"
                                                     else "")


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class Step:
    node: fx.Node
    rule: Rule | None = None          # a hand rule, or None for the generic one
    generic: str | None = None        # key of the generic VJP module
    tuple_item: bool = False          # getitem of a tuple output: the gradient goes to that item


class Backward(nn.Module):
    """The backward pass over a set of traced nodes: one step per node, a hand rule or a generic VJP.

    Built once at export with the activations of an example run (``env``); ``run`` is called inside the
    probe module's forward, so everything it does is exported as forward ops.
    """

    def __init__(self, graph: ProbeGraph, env: dict, nodes: list[fx.Node], needed: set, use_hand_rules: bool = True,
                 cache=None):
        super().__init__()
        from . import generic, rules  # noqa: F401  (rules registers the hand rules)

        self.graph_ref = [graph]  # not a submodule: the probe module owns the traced model
        self.steps: dict[fx.Node, Step] = {}
        self.vjps = nn.ModuleDict()
        self.derived = cache if cache is not None else generic.VJPCache()
        for node in nodes:
            self.steps[node] = self._plan(node, env, needed, use_hand_rules)

    @property
    def graph(self) -> ProbeGraph:
        return self.graph_ref[0]

    def _plan(self, node: fx.Node, env: dict, needed: set, use_hand_rules: bool) -> Step:
        graph_module = self.graph.module
        if not _carries_gradient(env.get(node)):  # sizes, shapes, masks, indices: nothing flows back
            return Step(node)
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(env.get(node.args[0]), (tuple, list)):
            return Step(node, tuple_item=True)
        call = make_call(graph_module, node, env)
        # integer and boolean inputs (masks from comparisons, indices) get no gradient, as in autograd
        wanted = [n for n in call.inputs if n in needed and env[n].is_floating_point()]
        # a tuple of tensors passed as one argument (``torch.cat(x.chunk(4, 1)[1:])``)
        packed = [n for n in node.all_input_nodes if n in needed and isinstance(env.get(n), (tuple, list))
                  and _carries_gradient(env[n])]
        if not wanted and not packed:
            return Step(node)
        # the generic rule differentiates tensor arguments only: a tuple argument takes its hand rule always
        rule = RULES.find(node, call.module) if use_hand_rules or packed else None
        if rule is not None and (rule.accepts is None or rule.accepts(call)) and (rule.takes_tuples or not packed):
            return Step(node, rule=rule)
        if packed:  # never drop this gradient in silence
            raise no_rule_error(graph_module, node, f"it takes the tuple {', '.join(n.name for n in packed)} as "
                                f"one argument, and only a hand rule ({_tuple_rules()}) routes a gradient into one")
        key = self.derived.vjp(graph_module, call, wanted, where(graph_module, node), self.vjps)
        return Step(node, generic=key)

    def input_grads(self, node: fx.Node, env: dict, grad) -> list:
        """[(input node, gradient)] of one node for its output gradient ``grad``."""
        step = self.steps[node]
        if step.tuple_item:
            return [(node.args[0], ("item", node.args[1], grad))]
        if step.rule is None and step.generic is None:
            return []
        call = make_call(self.graph.module, node, env)
        if step.rule is not None:
            result = step.rule.backward(call, grad)
            if isinstance(result, dict):
                return list(result.items())
            return [(call.inputs[0], result)]
        return self.vjps[step.generic].apply(call, grad)

    def run(self, env: dict, grad_logits: torch.Tensor, nodes: list[fx.Node], keep=(), broadcastable=()) -> dict:
        """Gradients of every node in ``keep`` for per-sample logit cotangents ``grad_logits``, running the
        steps over ``nodes`` (execution order) in reverse.

        Nodes in ``broadcastable`` may receive a gradient that only broadcasts to their shape (the spatial
        mean is all Grad-CAM reads; expanding a [B, K, 1, 1] pooling gradient cost 1 ms of a 19 ms call).
        """
        needed = set(nodes) | set(keep)
        grads = {self.graph.logits: grad_logits}
        kept = {}
        for node in reversed(nodes):
            if node not in grads:
                continue
            grad = grads.pop(node)
            if isinstance(grad, dict):  # a tuple output: one gradient per item used, zeros elsewhere
                grad = [grad.get(i) for i in range(len(env[node]))]
            if node in keep:
                kept[node] = grad
            for input_node, input_grad in self.input_grads(node, env, grad):
                if input_node not in needed or input_grad is None or not _differentiable(env[input_node]):
                    continue
                if isinstance(input_grad, tuple) and input_grad and input_grad[0] == "item":
                    _, index, item_grad = input_grad
                    items = grads.setdefault(input_node, {})
                    for position, piece in _item_positions(len(env[input_node]), index, item_grad):
                        items[position] = piece if position not in items else items[position] + piece
                    continue
                shape = tuple(env[input_node].shape[1:])
                if input_node not in broadcastable and tuple(input_grad.shape[1:]) != shape:
                    input_grad = input_grad.expand((-1,) + shape)
                grads[input_node] = grads[input_node] + input_grad if input_node in grads else input_grad
        kept.update({node: grad for node, grad in grads.items() if node in keep})
        return kept


def _item_positions(length: int, index, grad):
    """(position, gradient) pairs of a tuple item's gradient: ``x[-1]`` is item ``length - 1``, and a slice
    ``x[1:]`` (itself a tuple) passes each of its items' gradients to their positions."""
    if isinstance(index, slice):
        return [(position, piece) for position, piece in zip(range(length)[index], grad) if piece is not None]
    return [(index % length, grad)]


def _tuple_rules() -> str:
    return ", ".join(rule.name for rule in RULES.rules if rule.takes_tuples)


def _carries_gradient(value) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_carries_gradient(item) for item in value)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _differentiable(value) -> bool:
    return isinstance(value, (tuple, list)) or (isinstance(value, torch.Tensor) and value.is_floating_point())


def no_rule_error(graph_module: fx.GraphModule, node: fx.Node, why: str) -> ExportError:
    return ExportError(f"{where(graph_module, node)} lies between the layer to differentiate and the logits, and "
                       f"its backward cannot be built: {why}. Hand rules exist for: {supported_operations()}; "
                       "any other differentiable call gets a generic rule derived by autograd.")


def update_readme(path) -> bool:
    """Rewrite the generated rule list between ``<!-- rules:begin -->`` and ``<!-- rules:end -->``; True if changed."""
    import re
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    block = f"<!-- rules:begin -->\n{supported_operations(markdown=True)}\n<!-- rules:end -->"
    updated = re.sub(r"<!-- rules:begin -->\n(?:.*?\n)?<!-- rules:end -->", lambda _: block, text, flags=re.S)
    if updated != text:
        path.write_text(updated)
    return updated != text


if __name__ == "__main__":  # python -m gradprobe.export.backward README.md
    import sys

    from gradprobe.export.backward import update_readme as update  # the package's registry, not __main__'s

    print("updated" if update(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
