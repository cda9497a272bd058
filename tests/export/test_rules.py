"""Every hand-written backward rule, and the generic autograd-derived rule, equal autograd on one call.

Each case is a tiny module around one operation in one of its forms (module, function, method); the rule the
registry picks for the traced call is run on the saved activations and compared with ``torch.autograd.grad``
of the same call, and so is the generic rule (a VJP traced with make_fx) for the same call.
"""
from __future__ import annotations

import copy
import operator
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from gradprobe.export import rules  # noqa: F401  (registers the rules)
from gradprobe.export.backward import RULES, Call, Rule, Registry, supported_operations
from gradprobe.export.generic import VJPCache

ROOT = Path(__file__).resolve().parents[2]


class Op(nn.Module):
    def __init__(self, function, module: nn.Module | None = None):
        super().__init__()
        self.function = function
        self.layer = module

    def forward(self, x):
        return self.function(self, x)


def _case(layer=None, call=None):
    if layer is not None:
        return Op(lambda self, x: self.layer(x), layer)
    return Op(call)


BN = nn.BatchNorm2d(4).eval()
with torch.no_grad():
    BN.running_mean.uniform_(-1, 1)
    BN.running_var.uniform_(0.5, 2)
    BN.weight.uniform_(0.5, 1.5)

CASES = {
    "linear": (_case(nn.Linear(6, 5)), (3, 6)),
    "linear_tokens": (_case(nn.Linear(6, 5)), (3, 4, 6)),
    "conv_stride2": (_case(nn.Conv2d(4, 6, 3, 2, 1)), (3, 4, 9, 9)),
    "conv_dilated_grouped": (_case(nn.Conv2d(4, 6, 3, 1, 2, dilation=2, groups=2)), (3, 4, 8, 8)),
    "conv_functional": (_case(call=lambda self, x: F.conv2d(x, torch.ones(2, 4, 3, 3) / 9, None, 1, 1)), (3, 4, 6, 6)),
    "batch_norm": (_case(BN), (3, 4, 5, 5)),
    "relu": (_case(nn.ReLU()), (3, 4, 5, 5)),
    "relu_function": (_case(call=lambda self, x: F.relu(x)), (3, 4, 5, 5)),
    "relu_method": (_case(call=lambda self, x: x.relu()), (3, 4, 5, 5)),
    "relu6": (_case(nn.ReLU6()), (3, 4, 5, 5)),
    "hardtanh": (_case(call=lambda self, x: F.hardtanh(x, -0.5, 0.5)), (3, 4, 5, 5)),
    "leaky_relu": (_case(nn.LeakyReLU(0.2)), (3, 4, 5, 5)),
    "hardsigmoid": (_case(nn.Hardsigmoid()), (3, 4, 5, 5)),
    "silu": (_case(nn.SiLU()), (3, 4, 5, 5)),
    "sigmoid": (_case(call=lambda self, x: x.sigmoid()), (3, 4, 5, 5)),
    "tanh": (_case(nn.Tanh()), (3, 4, 5, 5)),
    "gelu": (_case(nn.GELU()), (3, 4, 5, 5)),
    "gelu_tanh": (_case(nn.GELU(approximate="tanh")), (3, 4, 5, 5)),
    "softmax": (_case(call=lambda self, x: x.softmax(dim=-1)), (3, 4, 5)),
    "dropout": (_case(nn.Dropout(0.3).eval()), (3, 4, 5, 5)),
    "max_pool_overlapping": (_case(nn.MaxPool2d(3, 2, 1)), (3, 4, 9, 9)),
    "max_pool_ceil_dilated": (_case(nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True)), (3, 4, 10, 10)),
    "max_pool_windows": (_case(call=lambda self, x: F.max_pool2d(x, 2)), (3, 4, 8, 8)),
    "avg_pool_resnet_d": (_case(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)), (3, 4, 7, 7)),
    "avg_pool_padded": (_case(nn.AvgPool2d(3, 2, 1)), (3, 4, 9, 9)),
    "adaptive_avg_pool_7": (_case(nn.AdaptiveAvgPool2d(7)), (3, 4, 2, 3)),
    "adaptive_avg_pool_uneven": (_case(call=lambda self, x: F.adaptive_avg_pool2d(x, (3, 2))), (3, 4, 7, 5)),
    "adaptive_avg_pool_1": (_case(call=lambda self, x: F.adaptive_avg_pool2d(x, 1)), (3, 4, 5, 5)),
    "mean_dims": (_case(call=lambda self, x: x.mean([2, 3])), (3, 4, 5, 5)),
    "mean_keepdim": (_case(call=lambda self, x: torch.mean(x, (2, 3), keepdim=True)), (3, 4, 5, 5)),
    "sum_dims": (_case(call=lambda self, x: x.sum(dim=-1)), (3, 4, 5)),
    "flatten": (_case(call=lambda self, x: torch.flatten(x, 1)), (3, 4, 5, 5)),
    "view": (_case(call=lambda self, x: x.view(x.size(0), -1)), (3, 4, 5, 5)),
    "permute": (_case(call=lambda self, x: x.permute(0, 2, 3, 1)), (3, 4, 5, 6)),
    "transpose": (_case(call=lambda self, x: x.transpose(1, 2)), (3, 4, 5)),
    "cat": (_case(call=lambda self, x: torch.cat([x, x * 2, x.sigmoid()], 1)), (3, 4, 5, 5)),
    "chunk": (_case(call=lambda self, x: x.chunk(2, dim=1)[1] * 3), (3, 4, 5, 5)),
    "split": (_case(call=lambda self, x: torch.split(x, [1, 3], dim=1)[0]), (3, 4, 5, 5)),
    "unbind": (_case(call=lambda self, x: x.unbind(1)[2]), (3, 4, 5)),
    # Res2Net reads its last split as ``spx[-1]``: a negative index must reach the last item's gradient
    "split_negative_index": (_case(call=lambda self, x: torch.split(x, 1, dim=1)[-1] * 2 + x.chunk(2, 1)[0][:, :1]),
                             (3, 4, 5, 5)),
    "split_slice": (_case(call=lambda self, x: torch.cat(x.chunk(4, dim=1)[1:], dim=1)), (3, 4, 5, 5)),
    "stack": (_case(call=lambda self, x: torch.stack([x, x * 2], dim=2).flatten(1, 2)), (3, 4, 5, 5)),
    "stack_tuple": (_case(call=lambda self, x: torch.stack(x.chunk(2, dim=1)[::-1], dim=-1) * 3), (3, 4, 5, 5)),
    "getitem_token": (_case(call=lambda self, x: x[:, 0]), (3, 5, 4)),
    "getitem_slice": (_case(call=lambda self, x: x[:, 1:3, ..., None]), (3, 5, 4)),
    "add_broadcast": (_case(call=lambda self, x: x + x.mean((2, 3), keepdim=True)), (3, 4, 5, 5)),
    "sub": (_case(call=lambda self, x: x - x.sigmoid()), (3, 4, 5, 5)),
    "mul_gate": (_case(call=lambda self, x: x * torch.sigmoid(x.mean((2, 3), keepdim=True))), (3, 4, 5, 5)),
    "mul_scalar": (_case(call=lambda self, x: x * 0.5), (3, 4, 5, 5)),
    "div": (_case(call=lambda self, x: x / (x * x + 1)), (3, 4, 5, 5)),
}
# calls with no hand rule: the generic rule must cover them
GENERIC = {
    # Hardswish: a hand rule measured no faster than the generic one (benchmarks/results/rules_speed.md)
    "hardswish": (_case(nn.Hardswish()), (3, 4, 5, 5)),
    "hardswish_function": (_case(call=lambda self, x: F.hardswish(x)), (3, 4, 5, 5)),
    "layer_norm": (_case(nn.LayerNorm(5)), (3, 4, 5)),
    "group_norm": (_case(nn.GroupNorm(2, 4)), (3, 4, 5, 5)),
    "elu": (_case(nn.ELU()), (3, 4, 5, 5)),
    "mish": (_case(call=lambda self, x: F.mish(x)), (3, 4, 5, 5)),
    "conv_same_padding": (_case(nn.Conv2d(4, 4, 4, padding="same")), (3, 4, 6, 6)),
    "interpolate": (_case(call=lambda self, x: F.interpolate(x, scale_factor=2, mode="bilinear")), (3, 4, 5, 5)),
    "roll": (_case(call=lambda self, x: torch.roll(x, (1, 2), (2, 3))), (3, 4, 5, 5)),
    "pad": (_case(call=lambda self, x: F.pad(x, (1, 0, 2, 1))), (3, 4, 5, 5)),
    "attention": (_case(nn.MultiheadAttention(4, 2, batch_first=True).eval()), None),
}


def _traced(module: nn.Module, shape):
    graph_module = fx.symbolic_trace(module)
    graph_module.gradprobe_batched = frozenset(graph_module.graph.nodes)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    interpreter = fx.Interpreter(graph_module, garbage_collect_values=False)
    interpreter.run(x)
    return graph_module, dict(interpreter.env), x


def _nodes(graph_module):
    return [n for n in graph_module.graph.nodes if n.op in ("call_module", "call_function", "call_method")]


def _autograd(module: nn.Module, x: torch.Tensor, node_count: int):
    """Gradient of every traced node's float inputs for a random output gradient, by autograd."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(y, x, grad)[0], grad


def _backward(graph_module, env, x_node, output_node, grad, hand: bool):
    """Run the rules (or the generic rule) node by node from the output back to the placeholder."""
    from gradprobe.export.backward import Backward
    from gradprobe.export.graph import ProbeGraph

    nodes = _nodes(graph_module)
    probe_graph = ProbeGraph(graph_module, nodes[0], nodes[0], output_node, "", "")
    backward = Backward(probe_graph, env, nodes, set(nodes) | {x_node}, use_hand_rules=hand, cache=VJPCache())
    return backward, backward.run(env, grad, nodes, keep={x_node})[x_node]


def _check(name, case, hand: bool):
    module, shape = case
    if shape is None:  # self-attention: a leaf module returning (output, weights)
        module = Op(lambda self, x: self.layer(x, x, x, need_weights=False)[0], case[0].layer)
        shape = (3, 5, 4)
    graph_module, env, x = _traced(module, shape)
    output_node = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
    expected, grad = _autograd(module, x, len(_nodes(graph_module)))
    x_node = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    backward, got = _backward(graph_module, env, x_node, output_node, grad, hand)
    torch.testing.assert_close(got.expand_as(expected), expected, rtol=1e-5, atol=1e-6)
    return backward


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_rule_matches_autograd(name):
    backward = _check(name, CASES[name], hand=True)
    used = [step for step in backward.steps.values() if step.rule is not None]
    assert used, f"{name}: no hand rule was used"
    generic = [step.node.name for step in backward.steps.values() if step.generic is not None]
    assert not generic, f"{name}: fell back to the generic rule for {generic}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_generic_rule_matches_autograd(name):
    """The autograd-derived rule on the same calls (what any call without a hand rule gets)."""
    backward = _check(name, CASES[name], hand=False)
    # a tuple of tensors as one argument (torch.cat(parts[1:])) always takes the hand rule that routes it
    assert all(step.rule is None or step.rule.takes_tuples for step in backward.steps.values())


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_calls_without_hand_rule_are_generic(name):
    backward = _check(name, GENERIC[name], hand=True)
    assert any(step.generic is not None for step in backward.steps.values())


def test_a_tuple_argument_without_a_rule_is_refused_not_dropped():
    """A call that takes a tuple of tensors as one argument and has no rule to route its gradient (hstack here)
    is an ExportError naming the node: the generic rule differentiates tensor arguments only."""
    from gradprobe.base.errors import ExportError

    module = _case(call=lambda self, x: torch.hstack(x.chunk(2, dim=1)) * 3)
    graph_module, env, x = _traced(module, (3, 4, 5, 5))
    output_node = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
    x_node = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    with pytest.raises(ExportError, match=r"hstack.*takes the tuple chunk as one argument"):
        _backward(graph_module, env, x_node, output_node, torch.ones(3, 4, 5, 5), hand=True)


def test_generic_graphs_hold_only_forward_ops():
    backward = _check("max_pool_overlapping", CASES["max_pool_overlapping"], hand=False)
    for module in backward.vjps.values():
        targets = {str(n.target) for n in module.traced.graph.nodes if n.op == "call_function"}
        assert not [t for t in targets if "backward" in t], targets


def test_one_rule_serves_module_function_and_method():
    relu = RULES.by_module[nn.ReLU]
    assert RULES.by_function[F.relu] is relu and RULES.by_function[torch.relu] is relu
    assert RULES.by_method["relu"] is relu
    assert RULES.by_function[operator.add].name == "add"


def test_subclass_that_rewrites_forward_is_not_the_base_layer():
    class Same(nn.Conv2d):
        pass

    class Rewritten(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    node = fx.Graph().create_node("call_module", "conv", (), {})
    assert RULES.find(node, Same(1, 1, 1)).name == "conv2d"
    assert RULES.find(node, Rewritten(1, 1, 1)) is None


def test_a_rule_is_registered_once():
    registry = Registry()
    registry.add(Rule("a", lambda call, grad: grad, modules=(nn.Identity,)))
    with pytest.raises(ValueError, match="already has"):
        registry.add(Rule("b", lambda call, grad: grad, modules=(nn.Identity,)))


def test_supported_list_is_generated_into_the_readme():
    listing = supported_operations(markdown=True)
    assert "nn.ReLU" not in listing and "ReLU, F.relu, torch.relu, .relu()" in listing
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- rules:begin -->\n(.*?)\n<!-- rules:end -->", readme, re.S)
    assert block, "README.md lacks the generated <!-- rules:begin --> block"
    assert block.group(1) == listing, "README's rule list is stale: run `python -m gradprobe.export.backward`"


AT_THE_KINKS = {  # name: (call, the points where its derivative jumps)
    "relu": (nn.ReLU(), (0.0,)),
    "relu6": (nn.ReLU6(), (0.0, 6.0)),
    "hardtanh": (nn.Hardtanh(-0.5, 0.5), (-0.5, 0.5)),
    "leaky_relu": (nn.LeakyReLU(0.2), (0.0,)),
    "hardswish": (nn.Hardswish(), (-3.0, 3.0)),
    "hardsigmoid": (nn.Hardsigmoid(), (-3.0, 3.0)),
}


@pytest.mark.parametrize("name", sorted(AT_THE_KINKS))
def test_rule_takes_autograds_side_at_a_kink(name):
    """An input exactly at a kink (a real ResNet-sized batch of random normals holds a 3.0): the rule gives
    autograd's derivative there, not the other side's (Hardswish's slope jumps from 1.5 to 1 at 3; a former
    hand rule took the 1.5)."""
    layer, points = AT_THE_KINKS[name]
    module = _case(layer)
    graph_module = fx.symbolic_trace(module)
    graph_module.gradprobe_batched = frozenset(graph_module.graph.nodes)
    x = torch.tensor([[p + d for p in points for d in (-1e-3, 0.0, 1e-3)]])
    interpreter = fx.Interpreter(graph_module, garbage_collect_values=False)
    interpreter.run(x)
    expected, grad = _autograd(module, x, 1)
    output_node = next(n for n in graph_module.graph.nodes if n.op == "output").args[0]
    x_node = next(n for n in graph_module.graph.nodes if n.op == "placeholder")
    _, got = _backward(graph_module, dict(interpreter.env), x_node, output_node, grad, hand=True)
    torch.testing.assert_close(got.expand_as(expected), expected, rtol=0, atol=1e-7)


SMOOTH = {  # name: (activation, the range checked, the zero of its derivative left out)
    "sigmoid": (nn.Sigmoid(), 14.0, None),
    "silu": (nn.SiLU(), 14.0, -1.278),
    "tanh": (nn.Tanh(), 7.0, None),  # exp(-2|x|): ONNX Runtime's Exp keeps its relative digits down to about e^-16
    "gelu_tanh": (nn.GELU(approximate="tanh"), 4.0, -0.752),
}


class RuleInGraph(nn.Module):
    """dy/dx of one activation as its hand rule computes it (output gradient 1), to run in ONNX Runtime."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.node = fx.Graph().placeholder("x")
        self.rule = RULES.find(fx.symbolic_trace(_case(layer)).graph.find_nodes(op="call_module")[0], layer)

    def forward(self, x):
        call = Call(self.node, self.layer, (self.node,), {}, self.layer(x), [self.node], {self.node: x})
        return self.rule.backward(call, torch.ones_like(x))


@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_saturated_activation_derivative_keeps_its_digits_in_onnxruntime(name, tmp_path):
    """Where a sigmoid gate saturates (squeeze-excitation gates of a briefly trained EfficientNet-B0 reach
    |x| > 8), its derivative is tiny but not zero, and the per-layer norm of the gate's conv is made of it.
    y (1 - y) in ONNX Runtime is 1.5e-2 off there in relative terms (1 - y cancels, and ONNX Runtime's Sigmoid
    is itself far off in its tails), which put that model's layer norms 8.5e-3 off; 1 - tanh^2 and GELU's
    0.5 (1 + tanh) cancel the same way. The rules must keep a few ulps."""
    import onnxruntime

    layer, limit, zero = SMOOTH[name]
    x = torch.linspace(-limit, limit, 2801)
    if zero is not None:  # next to a zero of the derivative its relative error is the sum's cancellation
        x = x[(x - zero).abs() > 0.1]
    torch.onnx.export(RuleInGraph(layer).eval(), (x,), str(tmp_path / "rule.onnx"), dynamo=False,
                      input_names=["x"])
    session = onnxruntime.InferenceSession(str(tmp_path / "rule.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0]).double()
    exact = x.double().requires_grad_(True)
    expected = torch.autograd.grad(copy.deepcopy(layer).double()(exact).sum(), exact)[0]
    relative = (got - expected).abs() / expected.abs()
    assert relative.max() < 1e-5, f"{name}: {relative.max():.1e} off in relative terms at x = {x[relative.argmax()]:.2f}"
