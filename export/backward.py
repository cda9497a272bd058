"""Backward rules written as ordinary forward ops, so the exported graph needs no autograd.

Each rule maps the gradient of a layer's output to the gradient of its input (a vector-Jacobian
product) for eval mode: BatchNorm uses its running statistics and Dropout is the identity. The
rules only ever see one batch of independent samples, so the batched backward of per-sample
cotangents gives every sample's own activation gradient.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from gradprobe.base.errors import ExportError

from .graph import ProbeGraph

_IDENTITY_MODULES = (nn.Dropout, nn.Identity)
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
SUPPORTED = ("Linear, Conv2d (zero padding, any stride/dilation/groups), ReLU, ReLU6, Dropout, Identity, "
             "Flatten, BatchNorm1d/2d (eval), MaxPool2d and AvgPool2d with kernel == stride, "
             "AdaptiveAvgPool2d(1), torch.flatten / view / reshape, F.relu, residual add")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv_backward(module: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor):
    """dL/dx of a convolution is the transposed convolution of dL/dy with the same weights."""
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return None
    stride, padding, dilation = _pair(module.stride), _pair(module.padding), _pair(module.dilation)
    kernel = module.weight.shape[2:]
    if stride == (1, 1) and all(dilation[i] * (kernel[i] - 1) >= padding[i] for i in (0, 1)):
        # the same as a plain convolution with the kernel flipped and in/out swapped (per group), which
        # ONNX Runtime runs about 4x faster than ConvTranspose (73 ms of 145 in the deep ResNet graph)
        groups, outputs, inputs = module.groups, module.weight.shape[0], module.weight.shape[1]
        flipped = module.weight.reshape(groups, outputs // groups, inputs, *kernel).transpose(1, 2)
        flipped = flipped.reshape(groups * inputs, outputs // groups, *kernel).flip(-1, -2)
        pad = [dilation[i] * (kernel[i] - 1) - padding[i] for i in (0, 1)]
        return F.conv2d(grad, flipped, None, 1, pad, dilation, groups)
    output_padding = [x.shape[2 + i] - ((y.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                        + dilation[i] * (kernel[i] - 1) + 1) for i in (0, 1)]
    return F.conv_transpose2d(grad, module.weight, None, stride, padding, output_padding, module.groups, dilation)


def _window_backward(module, x: torch.Tensor, grad: torch.Tensor):
    """Max/avg pooling with non-overlapping windows (kernel == stride, no padding).

    Max-pool routes the gradient to the first maximum of each window (an equality mask with the
    same tie-break as PyTorch's kernel), without the indices output that TensorRT rejects.
    """
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    if kernel != stride or _pair(module.padding) != (0, 0) or module.ceil_mode or \
            getattr(module, "divisor_override", None) or \
            (isinstance(module, nn.MaxPool2d) and _pair(module.dilation) != (1, 1)):
        return None
    (kh, kw), channels = kernel, x.shape[1]
    rows, cols = x.shape[2] // kh, x.shape[3] // kw
    windows = x[:, :, :rows * kh, :cols * kw].reshape(-1, channels, rows, kh, cols, kw)
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(-1, channels, rows, cols, kh * kw)
    if isinstance(module, nn.MaxPool2d):
        first = windows.argmax(dim=-1, keepdim=True)
        spread = (torch.arange(kh * kw, device=x.device) == first).to(grad.dtype) * grad[..., None]
    else:
        spread = grad[..., None].expand(-1, -1, -1, -1, kh * kw) / float(kh * kw)
    spread = spread.reshape(-1, channels, rows, cols, kh, kw).permute(0, 1, 2, 4, 3, 5)
    spread = spread.reshape(-1, channels, rows * kh, cols * kw)
    return F.pad(spread, (0, x.shape[3] - cols * kw, 0, x.shape[2] - rows * kh))


def _relu_backward(output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # a multiply by the 0/1 mask: ONNX Runtime's Where took 46 of 194 ms in the deep ResNet graph
    return grad * (output > 0).to(grad.dtype)


def _batchnorm_backward(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, grad: torch.Tensor):
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    return grad * scale.reshape((1, -1) + (1,) * (x.dim() - 2))


def _module_rule(module: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor):
    """Gradient of the module's input, or None when no rule covers the module."""
    if isinstance(module, nn.Linear):
        return grad @ module.weight
    if isinstance(module, nn.Conv2d):
        return _conv_backward(module, x, y, grad)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return _window_backward(module, x, grad)
    if isinstance(module, nn.ReLU6):
        return grad * ((x > 0) & (x < 6)).to(grad.dtype)
    if isinstance(module, nn.ReLU):
        return _relu_backward(y, grad)
    if isinstance(module, _IDENTITY_MODULES):
        return grad
    if isinstance(module, nn.Flatten):
        return grad.reshape((-1,) + tuple(x.shape[1:]))
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_var is not None:
        return _batchnorm_backward(module, x, grad)
    if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
        # left broadcastable [B, K, 1, 1]: ``backprop`` expands it only where a rule needs the full map
        return grad / float(x.shape[2] * x.shape[3])
    return None


def _input_grads(graph: ProbeGraph, node: fx.Node, env: dict, grad: torch.Tensor, needed: set):
    """[(input node, gradient)] for the inputs in ``needed``; ExportError when the node has no rule."""
    if node.op == "call_module":
        module = graph.module.get_submodule(node.target)
        x_node = node.args[0]
        if x_node not in needed:  # e.g. the first conv: the image gradient is never used
            return []
        result = _module_rule(module, env[x_node], env[node], grad)
        if result is not None:
            return [(x_node, result)]
        what = f"layer {node.target!r} ({type(module).__name__})"
    elif node.op == "call_function" and node.target in (F.relu, torch.relu):
        return [(node.args[0], _relu_backward(env[node], grad))]
    elif node.op == "call_function" and node.target is torch.flatten:
        x_node = node.args[0]
        return [(x_node, grad.reshape((-1,) + tuple(env[x_node].shape[1:])))]
    elif node.op == "call_method" and node.target in _RESHAPE_METHODS:
        x_node = node.args[0]
        return [(x_node, grad.reshape((-1,) + tuple(env[x_node].shape[1:])))]
    elif node.op == "call_method" and node.target == "relu":
        return [(node.args[0], _relu_backward(env[node], grad))]
    elif node.op == "call_function" and node.target in (operator.add, torch.add) and not node.kwargs:
        tensors = [arg for arg in node.args if isinstance(arg, fx.Node)]
        if all(tuple(env[arg].shape) == tuple(env[node].shape) for arg in tensors):
            return [(arg, grad) for arg in tensors]
        what = f"broadcasting add {node.name!r}"
    else:
        what = f"operation {node.name!r} ({getattr(node.target, '__name__', node.target)})"
    raise ExportError(f"{what} lies between the layer to differentiate and the logits, and gradprobe has no "
                      f"backward rule for it. Supported: {SUPPORTED}. Pick a later target_layer or replace the layer.")


def backprop(graph: ProbeGraph, env: dict, grad_logits: torch.Tensor, nodes: list[fx.Node],
             keep=(), broadcastable=()) -> dict:
    """Gradients of every node in ``keep`` for per-sample logit cotangents ``grad_logits``, running the
    rules over ``nodes`` (execution order) in reverse.

    Nodes in ``broadcastable`` may receive a gradient that only broadcasts to their shape (the spatial
    mean is all Grad-CAM reads; expanding a [B, K, 1, 1] pooling gradient cost 1 ms of a 19 ms call).
    """
    needed = set(nodes) | set(keep)
    grads = {graph.logits: grad_logits}
    kept = {}
    for node in reversed(nodes):
        grad = grads.pop(node)
        if node in keep:
            kept[node] = grad
        for input_node, input_grad in _input_grads(graph, node, env, grad, needed):
            if input_node not in needed:
                continue
            shape = tuple(env[input_node].shape[1:])
            if input_node not in broadcastable and tuple(input_grad.shape[1:]) != shape:
                input_grad = input_grad.expand((-1,) + shape)
            grads[input_node] = grads[input_node] + input_grad if input_node in grads else input_grad
    kept.update({node: grad for node, grad in grads.items() if node in keep})
    return kept


def check_head(graph: ProbeGraph, env: dict) -> None:
    """Raise ExportError now, naming the layer, if any head node lacks a backward rule."""
    backprop_to_target(graph, env, torch.zeros_like(env[graph.logits]))


def backprop_to_target(graph: ProbeGraph, env: dict, grad_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of the target activation for per-sample logit cotangents ``grad_logits``."""
    return backprop(graph, env, grad_logits, graph.head_nodes(), keep={graph.target},
                    broadcastable={graph.target})[graph.target]
