"""The hand-written backward rules: one registration per operation, serving its module, function and
method forms. A rule is a fast path; anything without one gets the generic autograd-derived rule.

Each rule returns the gradient of the call's first tensor input, or {input node: gradient} for calls with
several. ``accepts`` narrows a rule to the configurations it handles exactly (the rest go generic).
The pooling and convolution gradients are also the generic rule's decompositions of the matching aten
backward ops (``generic.DECOMPOSITIONS``), so both paths share one implementation.
"""
from __future__ import annotations

import itertools
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .backward import Call, _pair, register


# ------------------------------------------------------------------------------------------ helpers
def unbroadcast(grad: torch.Tensor, like, batched: bool) -> torch.Tensor | None:
    """``grad`` summed down to the shape of a broadcast operand ``like``. The batch dimension of a batched
    operand is never summed, and only the operand's static sizes are read (summing a size-1 dimension is a
    no-op): comparing the symbolic batch with 1 would make the exporter fix the batch size."""
    if not isinstance(like, torch.Tensor):
        return None
    extra = grad.dim() - like.dim()
    if extra > 0:
        grad = grad.sum(dim=tuple(range(extra)))
    dims = tuple(i for i in range(like.dim()) if not (i == 0 and batched) and like.shape[i] == 1)
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def _batched(call: Call, node) -> bool:
    return node in call.batched


# ----------------------------------------------------------------------------------- linear and conv
@register("linear", modules=(nn.Linear,), functions=(F.linear,))
def linear(call: Call, grad):
    weight = call.module.weight if call.module is not None else call.value(call.node.args[1])
    return grad @ weight


def conv_input_grad(grad: torch.Tensor, input_size, weight: torch.Tensor, stride, padding, dilation, groups):
    """dL/dx of a 2-D convolution: the transposed convolution of dL/dy with the same weights."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    kernel = weight.shape[2:]
    if stride == (1, 1) and all(dilation[i] * (kernel[i] - 1) >= padding[i] for i in (0, 1)):
        # the same as a plain convolution with the kernel flipped and in/out swapped (per group), which
        # ONNX Runtime runs much faster than ConvTranspose (benchmarks/rules_speed.py)
        outputs, inputs = weight.shape[0], weight.shape[1]
        flipped = weight.reshape(groups, outputs // groups, inputs, *kernel).transpose(1, 2)
        flipped = flipped.reshape(groups * inputs, outputs // groups, *kernel).flip(-1, -2)
        pad = [dilation[i] * (kernel[i] - 1) - padding[i] for i in (0, 1)]
        return F.conv2d(grad, flipped, None, 1, pad, dilation, groups)
    output_padding = [input_size[i] - ((grad.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                       + dilation[i] * (kernel[i] - 1) + 1) for i in (0, 1)]
    return F.conv_transpose2d(grad, weight, None, stride, padding, output_padding, groups, dilation)


def _conv_accepts(call: Call) -> bool:
    padding = call.option("padding", 4, 0)
    return not isinstance(padding, str) and call.option("padding_mode", None, "zeros") == "zeros" \
        and call.x.dim() == 4


@register("conv2d", modules=(nn.Conv2d,), functions=(F.conv2d,), accepts=_conv_accepts,
          note="zero padding, any stride/dilation/groups")
def conv2d(call: Call, grad):
    weight = call.module.weight if call.module is not None else call.value(call.node.args[1])
    return conv_input_grad(grad, call.x.shape[2:], weight, call.option("stride", 3, 1), call.option("padding", 4, 0),
                           call.option("dilation", 5, 1), call.option("groups", 6, 1))


def _bn_accepts(call: Call) -> bool:
    if call.module is not None:
        return call.module.running_var is not None and not call.module.training
    return call.option("training", 5, False) is False and call.value(call.node.args[2]) is not None


@register("batch_norm", modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), functions=(F.batch_norm,),
          accepts=_bn_accepts, note="eval mode")
def batch_norm(call: Call, grad):
    if call.module is not None:
        variance, weight, eps = call.module.running_var, call.module.weight, call.module.eps
    else:
        variance = call.value(call.node.args[2])
        weight = call.option("weight", 3)
        eps = call.option("eps", 7, 1e-5)
    scale = torch.rsqrt(variance + eps)
    if weight is not None:
        scale = scale * weight
    return grad * scale.reshape((1, -1) + (1,) * (call.x.dim() - 2))


# -------------------------------------------------------------------------------------- activations
def relu_mask(output: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # a multiply by the 0/1 mask, cheaper than Where in ONNX Runtime. The mask is read from this graph's own
    # forward, so the gradient is the one-sided derivative of the function it computed.
    return grad * (output > 0).to(grad.dtype)


@register("relu", modules=(nn.ReLU,), functions=(F.relu, torch.relu), methods=("relu",))
def relu(call: Call, grad):
    return relu_mask(call.output, grad)


def _hardtanh_bounds(call: Call):
    if call.module is not None:
        return call.module.min_val, call.module.max_val
    if call.node.target is F.relu6:
        return 0.0, 6.0
    return call.option("min_val", 1, -1.0), call.option("max_val", 2, 1.0)


@register("hardtanh", modules=(nn.Hardtanh,), functions=(F.hardtanh, F.relu6), note="incl. ReLU6")
def hardtanh(call: Call, grad):
    low, high = _hardtanh_bounds(call)
    x = call.x
    return grad * ((x > low) & (x < high)).to(grad.dtype)


@register("leaky_relu", modules=(nn.LeakyReLU,), functions=(F.leaky_relu,))
def leaky_relu(call: Call, grad):
    slope = call.option("negative_slope", 1, 0.01)
    return torch.where(call.x > 0, grad, grad * slope)


@register("hardsigmoid", modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,))
def hardsigmoid(call: Call, grad):
    x = call.x
    return grad * ((x > -3) & (x < 3)).to(grad.dtype) / 6


def logistic_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sigmoid(x) and its derivative sigmoid(x) sigmoid(-x), both from e = exp(-|x|) <= 1, so accurate to a few
    ulps in relative terms everywhere. y (1 - y) is not: 1 - y cancels once a gate saturates, and ONNX Runtime's
    Sigmoid is itself far off in relative terms in its tails (tests/export/test_rules.py measures both)."""
    e = torch.exp(-x.abs())
    r = 1 / (1 + e)
    return torch.where(x >= 0, r, e * r), e * r * r


@register("silu", modules=(nn.SiLU,), functions=(F.silu,))
def silu(call: Call, grad):
    s, derivative = logistic_parts(call.x)
    return grad * (s + call.x * derivative)


@register("sigmoid", modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), methods=("sigmoid",))
def sigmoid(call: Call, grad):
    return grad * logistic_parts(call.x)[1]


@register("tanh", modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), methods=("tanh",))
def tanh(call: Call, grad):
    return grad * 4 * logistic_parts(2 * call.x)[1]  # 1 - tanh(x)^2 = 4 sigmoid'(2x), without the cancellation


@register("gelu", modules=(nn.GELU,), functions=(F.gelu,))
def gelu(call: Call, grad):
    x = call.x
    if call.option("approximate", None, "none") == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
        # 0.5 (1 + tanh(u)) = sigmoid(2u) and 1 - tanh(u)^2 = 4 sigmoid'(2u), without the cancellations
        s, slope = logistic_parts(2 * inner)
        derivative = s + 2 * x * slope * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x * x)
    else:
        derivative = 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return grad * derivative


@register("softmax", modules=(nn.Softmax,), functions=(F.softmax, torch.softmax), methods=("softmax",),
          accepts=lambda call: call.option("dim", 1) is not None and call.option("dtype", None) is None)
def softmax(call: Call, grad):
    y, dim = call.output, call.option("dim", 1)
    return y * (grad - (grad * y).sum(dim=dim, keepdim=True))


@register("identity", modules=(nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout), functions=(F.dropout,),
          methods=("contiguous", "clone", "float"),
          accepts=lambda call: call.module is not None or call.node.op == "call_method"
          or call.option("training", 2, True) is False, note="Dropout in eval mode")
def identity(call: Call, grad):
    return grad


# ---------------------------------------------------------------------------------------- pooling
def max_pool_input_grad(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, kernel, stride, padding, dilation):
    """Max-pool gradient without the indices output (TensorRT rejects it): each output's gradient goes to the
    first maximum of its window in raster order (PyTorch's tie-break), found by equality with the pooled
    value at every kernel offset; a grouped transposed convolution with one-hot kernels puts it back."""
    kernel, stride, padding, dilation = _pair(kernel), _pair(stride or kernel), _pair(padding), _pair(dilation)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    height, width = x.shape[2], x.shape[3]
    rows, cols = y.shape[2], y.shape[3]
    span_h, span_w = (rows - 1) * sh + (kh - 1) * dh + 1, (cols - 1) * sw + (kw - 1) * dw + 1
    padded = F.pad(x, (pw, max(0, span_w - width - pw), ph, max(0, span_h - height - ph)), value=float("-inf"))
    taken = torch.zeros_like(y)
    spread = []
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh:i * dh + sh * (rows - 1) + 1:sh, j * dw:j * dw + sw * (cols - 1) + 1:sw]
            first = (window == y).to(grad.dtype) * (1 - taken)
            taken = taken + first
            spread.append(first * grad)
    channels = x.shape[1]
    stacked = torch.stack(spread, dim=2).reshape(-1, channels * kh * kw, rows, cols)
    one_hot = torch.zeros(kh * kw, 1, (kh - 1) * dh + 1, (kw - 1) * dw + 1, dtype=grad.dtype, device=grad.device)
    for i in range(kh):
        for j in range(kw):
            one_hot[i * kw + j, 0, i * dh, j * dw] = 1
    placed = F.conv_transpose2d(stacked, one_hot.repeat(channels, 1, 1, 1), None, (sh, sw), groups=channels)
    placed = F.pad(placed, (0, max(0, width + pw - placed.shape[3]), 0, max(0, height + ph - placed.shape[2])))
    return placed[:, :, ph:ph + height, pw:pw + width]


def _window_grad(x: torch.Tensor, grad: torch.Tensor, kernel, is_max: bool):
    """Non-overlapping windows (kernel == stride, no padding): reshape into windows, route or spread."""
    (kh, kw), channels = kernel, x.shape[1]
    rows, cols = x.shape[2] // kh, x.shape[3] // kw
    windows = x[:, :, :rows * kh, :cols * kw].reshape(-1, channels, rows, kh, cols, kw)
    windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(-1, channels, rows, cols, kh * kw)
    if is_max:
        first = windows.argmax(dim=-1, keepdim=True)
        spread = (torch.arange(kh * kw, device=x.device) == first).to(grad.dtype) * grad[..., None]
    else:
        spread = grad[..., None].expand(-1, -1, -1, -1, kh * kw) / float(kh * kw)
    spread = spread.reshape(-1, channels, rows, cols, kh, kw).permute(0, 1, 2, 4, 3, 5)
    spread = spread.reshape(-1, channels, rows * kh, cols * kw)
    return F.pad(spread, (0, x.shape[3] - cols * kw, 0, x.shape[2] - rows * kh))


def _pool_args(call: Call):
    kernel = call.option("kernel_size", 1)
    stride = call.option("stride", 2) or kernel
    return _pair(kernel), _pair(stride), _pair(call.option("padding", 3, 0))


@register("max_pool2d", modules=(nn.MaxPool2d,), functions=(F.max_pool2d,),
          accepts=lambda call: not call.option("return_indices", 6, False) and call.x.dim() == 4,
          note="any kernel/stride/padding/dilation/ceil_mode; first-maximum mask")
def max_pool2d(call: Call, grad):
    kernel, stride, padding = _pool_args(call)
    dilation = _pair(call.option("dilation", 4, 1))
    if kernel == stride and padding == (0, 0) and dilation == (1, 1) and not call.option("ceil_mode", 5, False):
        return _window_grad(call.x, grad, kernel, is_max=True)
    return max_pool_input_grad(call.x, call.output, grad, kernel, stride, padding, dilation)


def _avg_divisors(height: int, width: int, rows: int, cols: int, kernel, stride, padding, count_include_pad: bool,
                  divisor_override) -> torch.Tensor:
    """[1, 1, rows, cols] divisor of every average-pool window, as PyTorch's kernel computes it (window clipped
    to the padded image for ``count_include_pad``, to the image otherwise), from the static sizes."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    divisors = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            h0, w0 = i * sh - ph, j * sw - pw
            h1, w1 = min(h0 + kh, height + ph), min(w0 + kw, width + pw)
            size = (h1 - h0) * (w1 - w0)
            h0, w0, h1, w1 = max(h0, 0), max(w0, 0), min(h1, height), min(w1, width)
            divisors[i, j] = divisor_override or (size if count_include_pad else (h1 - h0) * (w1 - w0))
    return divisors.reshape(1, 1, rows, cols)


def avg_pool_input_grad(x: torch.Tensor, grad: torch.Tensor, kernel, stride, padding, ceil_mode: bool,
                        count_include_pad: bool, divisor_override):
    """Average-pool gradient: each output's gradient divided by its window's divisor, spread over the window
    by a grouped transposed convolution with a ones kernel."""
    kernel, stride, padding = _pair(kernel), _pair(stride or kernel), _pair(padding)
    (kh, kw), (ph, pw) = kernel, padding
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    divisor = _avg_divisors(height, width, grad.shape[2], grad.shape[3], kernel, stride, padding, count_include_pad,
                            divisor_override).to(grad)
    weights = torch.ones(channels, 1, kh, kw, dtype=grad.dtype, device=grad.device)
    placed = F.conv_transpose2d(grad / divisor, weights, None, stride, groups=channels)
    placed = F.pad(placed, (0, max(0, width + pw - placed.shape[3]), 0, max(0, height + ph - placed.shape[2])))
    return placed[:, :, ph:ph + height, pw:pw + width]


@register("avg_pool2d", modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,), accepts=lambda call: call.x.dim() == 4,
          note="any kernel/stride/padding/ceil_mode/count_include_pad")
def avg_pool2d(call: Call, grad):
    kernel, stride, padding = _pool_args(call)
    ceil_mode = call.option("ceil_mode", 4, False)
    include, override = call.option("count_include_pad", 5, True), call.option("divisor_override", 6, None)
    if kernel == stride and padding == (0, 0) and not ceil_mode and not override:
        return _window_grad(call.x, grad, kernel, is_max=False)
    return avg_pool_input_grad(call.x, grad, kernel, stride, padding, ceil_mode, include, override)


def _bins(size: int, out: int) -> torch.Tensor:
    """[out, size] averaging matrix of adaptive pooling along one axis (PyTorch's floor/ceil bin edges)."""
    rows = []
    for i in range(out):
        start, end = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(size)])
    # built from a list, not by slice assignment: the exporter lowers an in-place slice of a tensor the graph
    # creates to a ScatterND that ONNX Runtime cannot run (timm's VGG head pools 2x2 up to 7x7)
    return torch.tensor(rows)


def adaptive_avg_pool_input_grad(x: torch.Tensor, grad: torch.Tensor):
    """Adaptive average pooling is linear per axis: y = P_h x P_w^T, so dL/dx = P_h^T g P_w."""
    (height, width), (rows, cols) = x.shape[2:], grad.shape[2:]
    if rows == 1 and cols == 1:
        # left broadcastable [B, K, 1, 1]: ``Backward.run`` expands it only where a rule needs the full map
        return grad / float(height * width)
    p_h, p_w = _bins(height, rows).to(grad), _bins(width, cols).to(grad)
    return p_h.t() @ grad @ p_w


@register("adaptive_avg_pool2d", modules=(nn.AdaptiveAvgPool2d,), functions=(F.adaptive_avg_pool2d,),
          accepts=lambda call: call.x.dim() == 4, note="any output size")
def adaptive_avg_pool2d(call: Call, grad):
    return adaptive_avg_pool_input_grad(call.x, grad)


def _reduced_dims(call: Call):
    dims = call.option("dim", 1, None)
    if dims is None:
        return None
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return tuple(sorted(d % call.x.dim() for d in dims))


@register("mean", functions=(torch.mean,), methods=("mean",),
          accepts=lambda call: _reduced_dims(call) is not None and 0 not in _reduced_dims(call)
          and call.option("dtype", None) is None, note="over non-batch dims")
def mean(call: Call, grad):
    dims = _reduced_dims(call)
    count = math.prod(call.x.shape[d] for d in dims)
    if not call.option("keepdim", 2, False):
        for d in dims:
            grad = grad.unsqueeze(d)
    return grad / float(count)  # broadcastable: expanded where needed


@register("sum", functions=(torch.sum,), methods=("sum",),
          accepts=lambda call: _reduced_dims(call) is not None and 0 not in _reduced_dims(call)
          and call.option("dtype", None) is None, note="over non-batch dims")
def sum_(call: Call, grad):
    if not call.option("keepdim", 2, False):
        for d in _reduced_dims(call):
            grad = grad.unsqueeze(d)
    return grad


# ------------------------------------------------------------------------------------------ shapes
def _reshape_back(call: Call, grad):
    return grad.reshape((-1,) + tuple(call.x.shape[1:]))


register("reshape", modules=(nn.Flatten, nn.Unflatten), functions=(torch.flatten, torch.reshape, torch.squeeze,
                                                                   torch.unsqueeze),
         methods=("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"),
         accepts=lambda call: call.x.dim() >= 1 and call.output.dim() >= 1,
         note="the batch dimension kept first")(_reshape_back)


def _permutation(call: Call):
    if call.node.op == "call_method":
        dims = call.args[1:]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    else:
        dims = call.option("dims", 1)
    return [d % call.x.dim() for d in dims]


@register("permute", functions=(torch.permute,), methods=("permute",))
def permute(call: Call, grad):
    order = _permutation(call)
    inverse = [order.index(i) for i in range(len(order))]
    return grad.permute(inverse)


@register("transpose", functions=(torch.transpose,), methods=("transpose",))
def transpose(call: Call, grad):
    return grad.transpose(call.args[1], call.args[2])


def _cat_dim(call: Call) -> int:
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
    return dim % call.output.dim()


def _to_parts(parts, pieces) -> dict:
    """cat's and stack's gradient pieces handed to their parts: a list of nodes (constants skipped, a part
    used twice summed), or one node holding a tuple (``torch.cat(x.chunk(4, 1)[1:])``), which gets them as its
    items."""
    if isinstance(parts, fx.Node):
        return {parts: ("item", slice(None), list(pieces))}
    result = {}
    for part, piece in zip(parts, pieces):
        if hasattr(part, "op"):
            result[part] = piece if part not in result else result[part] + piece
    return result


@register("cat", functions=(torch.cat, torch.concat, torch.concatenate), takes_tuples=True)
def cat(call: Call, grad):
    dim, parts = _cat_dim(call), call.node.args[0]
    values = call.value(parts) if isinstance(parts, fx.Node) else [call.value(part) for part in parts]
    starts = itertools.accumulate((value.shape[dim] for value in values), initial=0)
    return _to_parts(parts, [grad.narrow(dim, start, value.shape[dim]) for start, value in zip(starts, values)])


@register("stack", functions=(torch.stack,), takes_tuples=True)
def stack(call: Call, grad):
    return _to_parts(call.node.args[0], grad.unbind(call.option("dim", 1, 0) % call.output.dim()))


@register("split", functions=(torch.split, torch.chunk, torch.unbind), methods=("split", "chunk", "unbind"),
          accepts=lambda call: call.node.target not in ("unbind", torch.unbind)
          or call.option("dim", 1, 0) % call.x.dim() != 0)
def split(call: Call, grad):
    pieces = [g if g is not None else torch.zeros_like(o) for g, o in zip(grad, call.output)]
    if call.node.target in ("unbind", torch.unbind):
        return torch.stack(pieces, dim=call.option("dim", 1, 0))
    dim = call.option("dim", 2, 0)
    return torch.cat(pieces, dim=dim)


def _basic_index(call: Call):
    index = call.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in index):
        return None
    if any(isinstance(i, slice) and (i.step not in (None, 1) or not all(
            isinstance(v, int) or v is None for v in (i.start, i.stop))) for i in index):
        return None
    return index


@register("getitem", functions=(operator.getitem,),
          accepts=lambda call: isinstance(call.x, torch.Tensor) and _basic_index(call) is not None
          and not _touches_batch(call), note="basic slicing of non-batch dimensions")
def getitem(call: Call, grad):
    """Gradient of basic slicing: zero padding around the slice, and unsqueeze where an int dropped a dim."""
    x, index = call.x, _basic_index(call)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = x.dim() - sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    index = index + (slice(None),) * (x.dim() - sum(1 for i in index if i is not None))
    position, pads = 0, []
    for item in index:
        if item is None:
            grad = grad.squeeze(position)
            continue
        if isinstance(item, slice) and item.start is None and item.stop is None:
            # the whole dimension: nothing to pad, and its size is never read (``slice.indices`` of the
            # symbolic batch would make the exporter fix the batch size)
            position += 1
            continue
        size = x.shape[position]
        if isinstance(item, int):
            start = item % size
            grad = grad.unsqueeze(position)
            pads.append((position, start, size - start - 1))
        else:
            start, stop, _ = item.indices(size)
            pads.append((position, start, size - max(stop, start)))
        position += 1
    for dim, before, after in pads:
        if before or after:
            grad = F.pad(grad, [0, 0] * (grad.dim() - 1 - dim) + [before, after])
    return grad


def _touches_batch(call: Call) -> bool:
    index = call.args[1] if isinstance(call.args[1], tuple) else (call.args[1],)
    first = index[0] if index else slice(None)
    return not (first is Ellipsis or (isinstance(first, slice) and first == slice(None)))


# --------------------------------------------------------------------------------------- arithmetic
def _operands(call: Call):
    args = call.node.args
    return args[0], args[1]


@register("add", functions=(operator.add, torch.add), methods=("add",),
          accepts=lambda call: "alpha" not in call.kwargs and len(call.node.args) == 2, note="with broadcasting")
def add(call: Call, grad):
    result = {}
    for operand in _operands(call):
        if hasattr(operand, "op") and isinstance(call.value(operand), torch.Tensor):
            piece = unbroadcast(grad, call.value(operand), _batched(call, operand))
            result[operand] = piece if operand not in result else result[operand] + piece
    return result


@register("sub", functions=(operator.sub, torch.sub), methods=("sub",),
          accepts=lambda call: "alpha" not in call.kwargs and len(call.node.args) == 2, note="with broadcasting")
def sub(call: Call, grad):
    a, b = _operands(call)
    result = {}
    for operand, sign in ((a, 1), (b, -1)):
        if hasattr(operand, "op") and isinstance(call.value(operand), torch.Tensor):
            piece = unbroadcast(grad if sign > 0 else -grad, call.value(operand), _batched(call, operand))
            result[operand] = piece if operand not in result else result[operand] + piece
    return result


@register("mul", functions=(operator.mul, torch.mul), methods=("mul",),
          accepts=lambda call: len(call.node.args) == 2, note="gates and scales, with broadcasting")
def mul(call: Call, grad):
    a, b = _operands(call)
    result = {}
    for operand, other in ((a, b), (b, a)):
        if hasattr(operand, "op") and isinstance(call.value(operand), torch.Tensor):
            piece = unbroadcast(grad * call.value(other), call.value(operand), _batched(call, operand))
            result[operand] = piece if operand not in result else result[operand] + piece
    return result


@register("div", functions=(operator.truediv, torch.div), methods=("div",),
          accepts=lambda call: len(call.node.args) == 2 and call.kwargs.get("rounding_mode") is None)
def div(call: Call, grad):
    a, b = _operands(call)
    result = {}
    denominator = call.value(b)
    if hasattr(a, "op") and isinstance(call.value(a), torch.Tensor):
        result[a] = unbroadcast(grad / denominator, call.value(a), _batched(call, a))
    if hasattr(b, "op") and isinstance(denominator, torch.Tensor):
        piece = unbroadcast(-grad * call.output / denominator, denominator, _batched(call, b))
        result[b] = piece if b not in result else result[b] + piece
    return result
