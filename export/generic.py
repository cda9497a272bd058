"""The generic backward rule: a call's vector-Jacobian product derived by autograd, traced into aten ops.

For a traced call without a hand rule, ``torch.autograd.grad`` through that one call is traced with
``make_fx`` (symbolic shapes, so the batch stays free) and decomposed into core aten forward ops; the
resulting graph module is called inside the probe module, so ``torch.onnx.export`` sees only forward
ops and never autograd (feasibility.md Q2: the make_fx recipe). Parameters and buffers are inputs of
the traced graph, not constants, so calls of the same layer type and shapes share one graph and the
weights are stored once in the ONNX file.

``per_sample_sqnorms`` does the same for the per-sample squared norms of a call's parameter gradients
(``layer_grads=True`` for layers without a closed form): ``vmap`` over the samples of a ``vjp`` with
respect to the parameters, traced the same way.

Traps (feasibility.md): the example batch must equal no other dimension (duck sizing would tie them),
so each graph is traced at a batch size chosen to differ from every other size in the call.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from gradprobe.base.errors import ExportError

from . import rules
from .backward import Call
from .reductions import squared_sum

aten = torch.ops.aten


# ------------------------------------------------------------------------------------ decompositions
def _conv_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, output_padding,
                   groups, output_mask):
    if transposed:
        return NotImplemented
    one_d = input.dim() == 3
    if one_d:  # as a 2-D convolution over a 1-pixel-high image
        grad_output, input, weight = grad_output.unsqueeze(2), input.unsqueeze(2), weight.unsqueeze(2)
        stride, padding, dilation = (1, stride[0]), (0, padding[0]), (1, dilation[0])
    elif input.dim() != 4:
        return NotImplemented
    grad_input = grad_weight = grad_bias = None
    if output_mask[0]:
        grad_input = rules.conv_input_grad(grad_output, input.shape[2:], weight, stride, padding, dilation, groups)
    if output_mask[1]:
        grad_weight = _conv_weight_grad(grad_output, input, weight, stride, padding, dilation, groups)
    if output_mask[2]:
        grad_bias = grad_output.sum(dim=(0, 2, 3))
    if one_d:
        grad_input = grad_input.squeeze(2) if grad_input is not None else None
        grad_weight = grad_weight.squeeze(2) if grad_weight is not None else None
    return grad_input, grad_weight, grad_bias


def _conv_weight_grad(grad, x, weight, stride, padding, dilation, groups):
    """dL/dW = sum over samples and positions of g_t a_t^T, with the patches a_t from a one-hot convolution."""
    out_channels, in_per_group, kh, kw = weight.shape
    channels = x.shape[1]
    one_hot = torch.eye(kh * kw, dtype=x.dtype, device=x.device).reshape(kh * kw, 1, kh, kw).repeat(channels, 1, 1, 1)
    patches = F.conv2d(x, one_hot, None, stride, padding, dilation, channels)  # [B, C*kh*kw, Ho, Wo]
    positions = patches.shape[2] * patches.shape[3]
    patches = patches.reshape(-1, groups, in_per_group * kh * kw, positions)
    grads = grad.reshape(-1, groups, out_channels // groups, positions)
    total = (grads @ patches.transpose(2, 3)).sum(dim=0)  # [groups, O/g, I/g*kh*kw]
    return total.reshape(out_channels, in_per_group, kh, kw)


def _max_pool_backward(grad_output, self, kernel_size, stride, padding, dilation, ceil_mode, indices):
    pooled = F.max_pool2d(self, kernel_size, stride or kernel_size, padding, dilation, ceil_mode)
    return rules.max_pool_input_grad(self, pooled, grad_output, kernel_size, stride or kernel_size, padding, dilation)


def _avg_pool_backward(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return rules.avg_pool_input_grad(self, grad_output, kernel_size, stride or kernel_size, padding, ceil_mode,
                                     count_include_pad, divisor_override)


def _adaptive_avg_pool_backward(grad_output, self):
    return rules.adaptive_avg_pool_input_grad(self, grad_output).expand_as(self)


def _slice_scatter(input, src, dim=0, start=None, end=None, step=1):
    """``input`` with ``src`` written into a slice, as slices and one concatenation: the exporter lowers
    slice_scatter to a ScatterND/Transpose chain that breaks on negative ends and broadcast sources (an in-place
    slice assignment such as Swin's shifted-window mask); ``cat`` and ``Slice`` are plain ONNX."""
    if step != 1:
        return NotImplemented
    dim = dim % input.dim()
    size = input.shape[dim]
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else (end + size if end < 0 else end)
    start, end = min(max(start, 0), size), min(max(end, start), size)
    middle = input.narrow(dim, start, end - start)
    # zeros_like + src rather than src.expand: the exporter's constant folder drops an Expand of a constant
    # scalar, leaving a rank-0 input to the Concat
    pieces = [input.narrow(dim, 0, start), torch.zeros_like(middle) + src.to(input.dtype),
              input.narrow(dim, end, size - end)]
    return torch.cat(pieces, dim)


def decompositions() -> dict:
    """Core aten decompositions plus the backward ops core aten leaves whole, as the hand rules compute them."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = dict(core_aten_decompositions())
    # LayerNorm as mean/var/rsqrt: the backward reads the forward's mean and rstd, and ONNX's
    # LayerNormalization outputs them only as extra outputs, which TensorRT's parser refuses
    table.update(get_decompositions([aten.native_layer_norm.default]))
    table[aten.convolution_backward.default] = _conv_backward
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool_backward
    table[aten.avg_pool2d_backward.default] = _avg_pool_backward
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool_backward
    table[aten.slice_scatter.default] = _slice_scatter
    return table


_DECOMPOSITIONS = None


def _table() -> dict:
    global _DECOMPOSITIONS
    if _DECOMPOSITIONS is None:
        _DECOMPOSITIONS = decompositions()
    return _DECOMPOSITIONS


# ------------------------------------------------------------------------------------------- calls
class _Slot:
    """A node's place in a call's arguments."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self):
        return f"<slot {self.index}>"


def _signature(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype))
    if isinstance(value, bool) or value is None:
        return ("const", value)
    if isinstance(value, int):
        return ("int",)
    if isinstance(value, float):
        return ("const", value)
    return ("const", repr(value))


def _module_key(module: nn.Module):
    simple = tuple(sorted((k, v) for k, v in vars(module).items()
                          if isinstance(v, (int, float, bool, str, tuple)) and not k.startswith("_")))
    state = tuple((name, tuple(t.shape), str(t.dtype)) for name, t in _state(module).items())
    return (type(module), repr(module), simple, state)


def _state(module: nn.Module) -> dict:
    return {**dict(module.named_parameters()), **{k: v for k, v in module.named_buffers() if v is not None}}


class CallSpec:
    """How one call is flattened into the traced graph's inputs: tensor slots, int slots (symbolic: they
    may be the batch size), module state, and the output gradients."""

    def __init__(self, graph_module: fx.GraphModule, call: Call, wanted: list):
        node = call.node
        self.slots = list(node.all_input_nodes)
        index = {n: i for i, n in enumerate(self.slots)}
        self.template = fx.node.map_arg((node.args, node.kwargs), lambda n: _Slot(index[n]))
        self.kind, self.target = node.op, node.target
        self.module = call.module
        self.state_names = list(_state(call.module)) if call.module is not None else []
        values = [call.values[n] for n in self.slots]
        leaves = [pytree.tree_flatten(v) for v in values]
        self.slot_specs = [spec for _, spec in leaves]
        self.leaf_kinds = [[_kind(leaf) for leaf in flat] for flat, _ in leaves]
        self.constants = [[leaf if _kind(leaf) == "const" else None for leaf in flat] for flat, _ in leaves]
        self.wanted = [index[n] for n in wanted]
        out_leaves, self.out_spec = pytree.tree_flatten(call.output)
        self.out_grads = [i for i, leaf in enumerate(out_leaves)
                          if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]
        target_key = _module_key(call.module) if call.module is not None else (node.op, node.target)
        self.key = (target_key, repr(self.template),
                    tuple(tuple(_signature(leaf) for leaf in flat) for flat, _ in leaves),
                    tuple(self.wanted), tuple(_signature(leaf) for leaf in out_leaves), str(self.out_spec))

    def inputs(self, call: Call) -> list:
        """The flat graph inputs of a call: traced leaves of every slot, then the module state."""
        flat = []
        for slot, kinds in zip(self.slots, self.leaf_kinds):
            leaves, _ = pytree.tree_flatten(call.values[slot])
            flat += [leaf for leaf, kind in zip(leaves, kinds) if kind != "const"]
        if self.module is not None:
            state = _state(call.module)
            flat += [state[name] for name in self.state_names]
        return flat

    def rebuild(self, flat: list):
        """(args, kwargs, state) from flat inputs, with the wanted tensor slots marked as requiring grad."""
        position, values = 0, []
        for number, (kinds, constants, spec) in enumerate(zip(self.leaf_kinds, self.constants, self.slot_specs)):
            leaves = []
            for kind, constant in zip(kinds, constants):
                if kind == "const":
                    leaves.append(constant)
                else:
                    leaves.append(flat[position])
                    position += 1
            values.append(pytree.tree_unflatten(leaves, spec))
        state = dict(zip(self.state_names, flat[position:position + len(self.state_names)]))
        return values, state, position + len(self.state_names)

    def run(self, values: list, state: dict):
        args, kwargs = _fill(self.template, values)
        if self.kind == "call_module":
            return torch.func.functional_call(self.module, state, tuple(args), kwargs)
        if self.kind == "call_function":
            return self.target(*args, **kwargs)
        return getattr(args[0], self.target)(*args[1:], **kwargs)


def _kind(leaf) -> str:
    if isinstance(leaf, torch.Tensor):
        return "tensor"
    if isinstance(leaf, int) and not isinstance(leaf, bool):
        return "int"
    return "const"


def _fill(template, values):
    return pytree.tree_map(lambda leaf: values[leaf.index] if isinstance(leaf, _Slot) else leaf, template,
                           is_leaf=lambda leaf: isinstance(leaf, _Slot))


# -------------------------------------------------------------------------------------------- trace
#: Batch sizes to trace at, in order of preference: primes, which model dimensions rarely equal.
TRACE_BATCHES = (7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53)


def free_batch(taken) -> int:
    """The first of ``TRACE_BATCHES`` equal to none of the sizes ``taken`` (duck sizing would tie them)."""
    for batch in TRACE_BATCHES:
        if batch not in taken:
            return batch
    raise ExportError(f"every candidate batch size ({TRACE_BATCHES[0]}..{TRACE_BATCHES[-1]}) is also a "
                      "dimension of some activation or weight")


def trace_batch(values, avoid=()) -> int:
    """A batch size equal to no other size in these values."""
    taken = set(avoid)
    for value in values:
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                taken.update(int(s) for s in leaf.shape[1:])
            elif isinstance(leaf, int) and not isinstance(leaf, bool):
                taken.add(int(leaf))
    return free_batch(taken)


def tensor_sizes(tensors) -> set[int]:
    """Every dimension of these tensors (parameters: a 7x7 kernel's 7 is no batch size to trace at either)."""
    return {int(size) for tensor in tensors for size in tensor.shape}


class _PlainNorms(torch.overrides.TorchFunctionMode):
    """Eval-mode ``F.batch_norm`` (and one without running statistics), and ``F.group_norm``, as plain
    arithmetic under vmap: vmap has no batching rule for the batch_norm op and would unroll a loop over the
    trace batch, and group_norm's batching rule folds the batch into a constant size (either way a graph only
    valid at that batch size). And ``F.conv2d`` as patches times weights (``F.conv1d`` too, as a 1-pixel-high
    2-D one: ECA's channel convolution): the batching rule of a convolution's weight gradient folds the
    samples into its groups, which ONNX needs constant."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            bound = dict(zip(names, args), **kwargs)
            if not bound.get("training", False) and bound.get("running_var") is not None:
                return _eval_batch_norm(**bound)
            if bound.get("running_mean") is None and bound.get("running_var") is None:
                return _batch_statistics_norm(**bound)
        if func is F.group_norm:
            names = ("input", "num_groups", "weight", "bias", "eps")
            return _group_norm(**dict(zip(names, args), **kwargs))
        if func in (F.conv1d, F.conv2d):
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            bound = dict(zip(names, args), **kwargs)
            if not isinstance(bound.get("padding", 0), str) and bound["input"].dim() == (3 if func is F.conv1d else 4):
                return _patch_conv2d(**bound) if func is F.conv2d else _patch_conv1d(**bound)
        return func(*args, **kwargs)


def _affine(y: torch.Tensor, weight, bias) -> torch.Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    y = y * weight.reshape(shape) if weight is not None else y
    return y + bias.reshape(shape) if bias is not None else y


def _eval_batch_norm(input, running_mean, running_var, weight=None, bias=None, eps=1e-5, **_):
    shape = (1, -1) + (1,) * (input.dim() - 2)
    y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var + eps).reshape(shape)
    return _affine(y, weight, bias)


def _batch_statistics_norm(input, weight=None, bias=None, eps=1e-5, **_):
    """``F.batch_norm`` without running statistics (training mode, no state to update): the input's own
    statistics over every dimension but the channels, as timm's weight-standardised convolutions
    (``ScaledStdConv2d``) normalise their weights."""
    dims = [0, *range(2, input.dim())]
    mean = input.mean(dim=dims, keepdim=True)
    variance = (input - mean).pow(2).mean(dim=dims, keepdim=True)
    return _affine((input - mean) * torch.rsqrt(variance + eps), weight, bias)


def _patch_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 2-D convolution as its input patches (a one-hot depthwise convolution of constant weights, as
    ``layer_grads.PatchExtractor``) times the weight matrix: its weight gradient is then a matmul."""
    out_channels, in_per_group, kh, kw = weight.shape
    one_hot = torch.eye(kh * kw, dtype=input.dtype, device=input.device).reshape(kh * kw, 1, kh, kw)
    patches = F.conv2d(input, one_hot.repeat(input.shape[1], 1, 1, 1), None, stride, padding, dilation,
                       input.shape[1])  # [N, C*kh*kw, Ho, Wo]
    rows, cols = patches.shape[2], patches.shape[3]
    patches = patches.reshape(-1, groups, in_per_group * kh * kw, rows * cols)
    out = weight.reshape(groups, out_channels // groups, in_per_group * kh * kw) @ patches
    out = out.reshape(-1, out_channels, rows, cols)
    return out + bias.reshape(1, -1, 1, 1) if bias is not None else out


def _patch_conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A 1-D convolution as a 2-D one over a 1-pixel-high image (``_patch_conv2d``)."""
    first = lambda value: value[0] if isinstance(value, (tuple, list)) else value  # noqa: E731
    out = _patch_conv2d(input.unsqueeze(2), weight.unsqueeze(2), bias, (1, first(stride)), (0, first(padding)),
                        (1, first(dilation)), groups)
    return out.squeeze(2)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    grouped = input.reshape(input.shape[0], num_groups, -1)  # under vmap, one sample: the size is 1
    mean = grouped.mean(dim=-1, keepdim=True)
    variance = (grouped - mean).pow(2).mean(dim=-1, keepdim=True)
    y = ((grouped - mean) * torch.rsqrt(variance + eps)).reshape(input.shape)
    return _affine(y, weight, bias)


def _make_fx(function, inputs, where: str, what: str) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx

    functorch = torch._C._functorch
    fallback = functorch._is_vmap_fallback_enabled()
    try:
        # vmap's fallback for an op without a batching rule loops over the trace batch: a graph valid at that
        # batch size only. Off, such an op raises instead (named below).
        functorch._set_vmap_fallback_enabled(False)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # the math form of scaled_dot_product_attention: its backward is plain matmul/softmax algebra, where
        # the fused CPU kernel's backward has no decomposition
        with warnings.catch_warnings(), sdpa_kernel(SDPBackend.MATH):
            warnings.simplefilter("ignore")
            traced = make_fx(function, tracing_mode="symbolic", decomposition_table=_table(),
                             _allow_non_fake_inputs=True)(*inputs)
            _portable(traced)
            if _mutates(traced):
                # a second trace of the graph, functionalized: an in-place write into a slice (a mask built by
                # slice assignment) becomes the slice_scatter that the table rewrites, not a copy_ that
                # torch.export would lower to a ScatterND/Transpose chain that ONNX Runtime refuses
                traced = make_fx(torch.func.functionalize(traced), tracing_mode="symbolic",
                                 decomposition_table=_table(), _allow_non_fake_inputs=True)(*inputs)
                _portable(traced)
    except ExportError as error:
        raise ExportError(f"{where}: {error}") from error
    except Exception as error:
        message = str(error).strip().splitlines()[0][:400] if str(error).strip() else type(error).__name__
        data_dependent = any(word in f"{type(error).__name__} {error}" for word in
                             ("DataDependent", "data-dependent", "data dependent", "GuardOnDataDependent",
                              "_local_scalar_dense", "item()"))
        why = ("its Python code branches on tensor values (data-dependent control flow), which no graph can "
               "express" if data_dependent else f"tracing autograd through it failed ({type(error).__name__}: "
               f"{message})")
        raise ExportError(f"{where}: cannot derive the {what}: {why}") from error
    finally:
        functorch._set_vmap_fallback_enabled(fallback)
    leftover = sorted({str(n.target) for n in traced.graph.nodes
                       if n.op == "call_function" and "backward" in str(n.target)})
    if leftover:
        raise ExportError(f"{where}: the {what} needs {leftover}, which no forward op decomposes")
    return traced


def _mutates(traced: fx.GraphModule) -> bool:
    return any(node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
               and node.target._schema.is_mutable for node in traced.graph.nodes)


def _portable(traced: fx.GraphModule) -> None:
    """Rewrite what decompositions under vmap leave that the ONNX exporter has no translation for:
    ``empty_permuted`` (an uninitialised buffer, always overwritten) becomes ``zeros`` of the same size. And drop
    dead code: unused size queries of tensors that functorch's wrappers leave behind as graph constants, which
    fail when run (a per-sample LayerNorm inside a module kept whole, e.g. MobileViT's block)."""
    for node in list(traced.graph.nodes):
        if node.op == "call_function" and node.target is aten.empty_permuted.default:
            with traced.graph.inserting_before(node):
                zeros = traced.graph.call_function(aten.zeros.default, (node.args[0],),
                                                   {k: v for k, v in node.kwargs.items() if k != "pin_memory"})
            node.replace_all_uses_with(zeros)
            traced.graph.erase_node(node)
    traced.graph.eliminate_dead_code()
    used = {node.target for node in traced.graph.nodes if node.op == "get_attr"}
    for name in [name for name in [*vars(traced), *traced._buffers] if name.startswith("_tensor_constant")]:
        if name not in used:
            delattr(traced, name)  # torch.export would snapshot it, and fail on a functorch wrapper
    traced.recompile()


#: Ops that read only a tensor's shape, dtype or device: a result built from them (round's backward,
#: ``zeros_like(grad)``) does not depend on the gradient's values.
_SHAPE_ONLY = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.zeros_like.default,
               aten.empty_like.default, aten.ones_like.default, aten.full_like.default, aten.new_zeros.default,
               aten.new_empty.default, aten.new_full.default}


def _depends_on(traced: fx.GraphModule, placeholders: set) -> bool:
    """Whether the output depends on the values of ``placeholders`` (not only on their shapes)."""
    reached = set(placeholders)
    for node in traced.graph.nodes:
        if node.target not in _SHAPE_ONLY and any(n in reached for n in node.all_input_nodes):
            reached.add(node)
    output = next(n for n in traced.graph.nodes if n.op == "output")
    return any(n in reached for n in pytree.tree_leaves(output.args[0]) if isinstance(n, fx.Node))


def _contiguous(values: list) -> list:
    """The traced graphs were recorded on contiguous tensors and may ``view`` them: a gradient coming out of a
    permute or transpose rule is made contiguous first (a no-op in ONNX)."""
    return [v.contiguous() if isinstance(v, torch.Tensor) else v for v in values]


class GenericVJP(nn.Module):
    """d(output)/d(wanted inputs) of one call, for output gradients, as a traced graph of aten forward ops."""

    def __init__(self, spec: CallSpec, traced: fx.GraphModule):
        super().__init__()
        self.spec_ref = [spec]
        self.traced = traced

    def apply(self, call: Call, grad) -> list:
        spec = self.spec_ref[0]
        out_leaves = pytree.tree_leaves(call.output)
        by_leaf = {}
        if isinstance(grad, (list, tuple)):  # one gradient (or None) per item of a tuple output
            position = 0
            for item, item_grad in zip(call.output, grad):
                count = len(pytree.tree_leaves(item))
                if isinstance(item, torch.Tensor):
                    by_leaf[position] = item_grad
                position += count
        else:
            by_leaf[spec.out_grads[0]] = grad
        grads = [by_leaf.get(i) for i in spec.out_grads]
        grads = [g if g is not None else torch.zeros_like(out_leaves[i]) for g, i in zip(grads, spec.out_grads)]
        grads = [g.expand_as(out_leaves[i]) for g, i in zip(grads, spec.out_grads)]
        results = self.traced(*_contiguous(spec.inputs(call)), *_contiguous(grads))
        results = results if isinstance(results, (list, tuple)) else [results]
        return [(spec.slots[i], g) for i, g in zip(spec.wanted, results)]


def _vjp_function(spec: CallSpec):
    def vjp(*flat):
        values, state, used = spec.rebuild(list(flat))
        grads = list(flat[used:])
        wanted = []
        for i in spec.wanted:
            values[i] = values[i].detach().requires_grad_(True)
            wanted.append(values[i])
        with torch.enable_grad():
            output = spec.run(values, state)
            leaves = pytree.tree_leaves(output)
            outputs = [leaves[i] for i in spec.out_grads]
            result = torch.autograd.grad(outputs, wanted, grads, allow_unused=True)
        return tuple(torch.zeros_like(w) if r is None else r for r, w in zip(result, wanted))
    return vjp


class VJPCache:
    """Traced VJPs by call signature: calls of the same layer type, configuration and shapes share one graph."""

    def __init__(self):
        self.traced = {}
        self.zero = []  # calls whose gradient is zero whatever the output gradient

    def vjp(self, graph_module: fx.GraphModule, call: Call, wanted: list, where: str, modules: nn.ModuleDict):
        """Register the call's generic VJP in ``modules``; its key, or None when its gradient is always zero."""
        spec = CallSpec(graph_module, call, wanted)
        if spec.key not in self.traced:
            self.traced[spec.key] = _trace_vjp(spec, call, where)
        traced = self.traced[spec.key]
        if traced is None:
            self.zero.append(where)
            return None
        key = f"vjp_{call.node.name}"
        modules[key] = GenericVJP(spec, traced)
        return key


def _example(spec: CallSpec, call: Call):
    """The call's inputs as saved (the probe module ran the model at a batch size equal to no other size, so
    symbolic tracing keeps the batch free), and one output for the gradient shapes."""
    state = _state(call.module) if call.module is not None else {}
    with torch.no_grad():
        output = spec.run([call.values[n] for n in spec.slots], state)
    return spec.inputs(call), pytree.tree_leaves(output), batch_of(call)


def _trace_vjp(spec: CallSpec, call: Call, where: str) -> fx.GraphModule | None:
    if not spec.out_grads:
        raise ExportError(f"{where}: its output is not a floating-point tensor (integer or boolean), so no "
                          "gradient flows through it: the operation is not differentiable")
    flat, out_leaves, _ = _example(spec, call)
    grads = [torch.randn_like(out_leaves[i]) for i in spec.out_grads]
    traced = _make_fx(_vjp_function(spec), flat + grads, where, "vector-Jacobian product")
    grad_placeholders = set(list(n for n in traced.graph.nodes if n.op == "placeholder")[len(flat):])
    if not _depends_on(traced, grad_placeholders):
        return None  # piecewise constant (round, sign, comparisons) or independent of the input
    return traced


def batch_of(call: Call) -> int | None:
    """Rows of the call's first batched input (the images' batch, or more where rows are folded into it)."""
    for node in call.inputs:
        if node in call.batched:
            return int(call.values[node].shape[0])
    return None


# --------------------------------------------------------------------------------- per-sample norms
def parameter_closure(node: fx.Node, batched: set) -> list[fx.Node]:
    """The nodes that compute ``node``'s inputs from parameters alone (get_attr and ops on them, e.g. timm's
    ``gamma.reshape(1, -1, 1, 1)``), in execution order."""
    found, stack = set(), [n for n in node.all_input_nodes if n not in batched]
    while stack:
        current = stack.pop()
        if current in found or current in batched or current.op == "placeholder":
            continue
        found.add(current)
        stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.get)


def _evaluate(graph_module: fx.GraphModule, nodes: list[fx.Node], parameters: dict) -> dict:
    env = {}
    for node in nodes:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node.op == "get_attr":
            env[node] = parameters[node.target] if node.target in parameters else \
                _attribute(graph_module, node.target)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = graph_module.get_submodule(node.target)(*args, **kwargs)
    return env


def _attribute(graph_module: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(graph_module.get_submodule(owner), name)


class GenericNorms(nn.Module):
    """Per-sample squared norms [B, P] of one call's parameter gradients for its output gradient, traced from
    a ``vmap`` over the samples of a ``vjp`` with respect to the parameters."""

    def __init__(self, spec: CallSpec, traced: fx.GraphModule, attributes: list[str], state_names: list[str]):
        super().__init__()
        self.spec_ref = [spec]
        self.traced = traced
        self.attributes, self.state_names = attributes, state_names

    def apply(self, call: Call, grad, graph_module: fx.GraphModule) -> torch.Tensor:
        spec = self.spec_ref[0]
        grad = grad[0] if isinstance(grad, (list, tuple)) else grad
        grad = grad.expand_as(pytree.tree_leaves(call.output)[spec.out_grads[0]])
        parameters = [_attribute(graph_module, name) for name in self.attributes]
        return self.traced(*_contiguous(spec.inputs(call)), *parameters, grad.contiguous())


def per_sample_norms(graph_module: fx.GraphModule, call: Call, attributes: list[str], state_names: list[str],
                     where: str, batch: int, rows: int = 1) -> GenericNorms:
    """Norms for the get_attr parameters ``attributes`` (read through ``parameter_closure``) and the module
    state entries ``state_names`` of one call, in that column order. ``rows``: consecutive rows of the call's
    batched inputs per image (Swin's windows, MobileViT's patches folded into the batch): each image's
    gradient is the vjp through all of its rows."""
    spec = CallSpec(graph_module, call, [])
    if len(spec.out_grads) != 1:
        raise ExportError(f"{where}: per-sample parameter norms need a call with one tensor output")
    batched_slots = [i for i, n in enumerate(spec.slots) if n in call.batched]
    current = batch_of(call)
    if current is not None and current != batch * rows:
        raise ExportError(f"{where}: its input holds {current} rows for {batch} images, not {rows} consecutive rows "
                          "per image; per-sample parameter norms need each image's rows together")
    if current is None:
        raise ExportError(f"{where}: none of its tensor inputs carries the batch of images (e.g. a class token "
                          "expanded to the batch), so per-sample gradients of its parameters are not supported")
    for i in batched_slots:
        value = call.values[spec.slots[i]]
        if not isinstance(value, torch.Tensor) or value.shape[0] != current:
            raise ExportError(f"{where}: an input that depends on the images is not a tensor with the batch "
                              "first; per-sample parameter norms need one")
    closure = parameter_closure(call.node, call.batched)
    closure_slots = [i for i, n in enumerate(spec.slots) if n in closure]

    def norms(*flat):
        values, state, used = spec.rebuild(list(flat))
        parameters = list(flat[used:used + len(attributes)])
        grad = flat[used + len(attributes)]

        def one(*sample):  # one image: its rows of every batched input and of the output gradient
            inputs, g = sample[:-1], sample[-1]

            def apply(*chosen):
                local, local_state = list(values), dict(state)
                for i, slot in enumerate(batched_slots):
                    local[slot] = inputs[i]
                computed = _evaluate(graph_module, closure, dict(zip(attributes, chosen[:len(attributes)])))
                for i in closure_slots:
                    local[i] = computed[spec.slots[i]]
                local_state.update(zip(state_names, chosen[len(attributes):]))
                return pytree.tree_leaves(spec.run(local, local_state))[spec.out_grads[0]]

            chosen = parameters + [state[name] for name in state_names]
            _, pullback = torch.func.vjp(apply, *chosen)
            return tuple(squared_sum(t) for t in pullback(g))

        by_image = [per_image(values[i], rows) for i in batched_slots] + [per_image(grad, rows)]
        with _PlainNorms():
            columns = torch.func.vmap(one)(*by_image)
        # stacked outside vmap: a stack under vmap traces to aten.empty_permuted, which the ONNX exporter lacks
        return torch.stack(columns, dim=1)

    flat, out_leaves, _ = _example(spec, call)
    parameters = [_attribute(graph_module, name).detach() for name in attributes]
    grad = torch.randn_like(out_leaves[spec.out_grads[0]])
    what = "per-sample parameter-gradient norms"
    traced = _make_fx(norms, flat + parameters + [grad], where, what)
    if _has_batch_constants(traced, batch):
        batched = _batched_positions(spec, batched_slots)
        weights = [v for i, v in enumerate(flat) if i not in batched and isinstance(v, torch.Tensor)] + parameters
        other = trace_batch(list(call.values.values()), avoid={batch} | tensor_sizes(weights))
        images = torch.arange(other) % batch
        taken = (images[:, None] * rows + torch.arange(rows)).flatten()  # whole images, each with its rows
        resized = [value[taken] if i in batched else value for i, value in enumerate(flat)]
        second = _make_fx(norms, resized + parameters + [grad[taken]], where, what)
        _free_batch_constants(traced, second, batch, other, where, rows)
    positions = _batched_positions(spec, batched_slots)
    _check_batch_free(traced, [_one_more_image(v, rows) if i in positions else v for i, v in enumerate(flat)]
                      + parameters + [_one_more_image(grad, rows)], where)
    return GenericNorms(spec, traced, attributes, state_names)


def _batched_positions(spec: CallSpec, batched_slots: list[int]) -> set[int]:
    """Positions in the flat inputs of the tensors that carry the batch."""
    positions, position = set(), 0
    for slot, kinds in enumerate(spec.leaf_kinds):
        for kind in kinds:
            if kind != "const":
                if slot in batched_slots:
                    positions.add(position)
                position += 1
    return positions


def _int_constants(node: fx.Node):
    return [v for v in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(v, int) and not isinstance(v, bool)]


def _has_batch_constants(traced: fx.GraphModule, batch: int) -> bool:
    """Whether an op's integer argument is a multiple of the trace batch: vmap's batching rules for convolution
    and group_norm fold the vmapped samples into the batch with concrete sizes, which make_fx records as
    constants (a graph valid at the trace batch only)."""
    return any(v != 0 and v % batch == 0 for node in traced.graph.nodes if node.op == "call_function"
               for v in _int_constants(node))


def _free_batch_constants(first: fx.GraphModule, second: fx.GraphModule, batch: int, other: int, where: str,
                          rows: int = 1) -> None:
    """Replace in ``first`` (traced at ``batch``) each integer argument that is k * batch where ``second`` (the same
    function traced at ``other``) has k * other by k times the number of images (the output gradient's rows, the
    last input, over ``rows`` per image). Constants equal in both traces are sizes of the layer, left alone."""
    nodes, others = list(first.graph.nodes), list(second.graph.nodes)
    if len(nodes) != len(others) or any((a.op, a.target) != (b.op, b.target) for a, b in zip(nodes, others)):
        raise ExportError(f"{where}: its per-sample parameter-gradient norms trace to a different graph at another "
                          "batch size, so no graph serves every batch size")
    grad = [n for n in nodes if n.op == "placeholder"][-1]
    with first.graph.inserting_after(grad):
        size = first.graph.call_function(aten.sym_size.int, (grad, 0))
    if rows > 1:
        with first.graph.inserting_after(size):
            size = first.graph.call_function(operator.floordiv, (size, rows))
    multiples = {1: size}

    def free(a, b):
        if isinstance(a, fx.Node) or a == b:
            return a
        k = a // batch if isinstance(a, int) and not isinstance(a, bool) else None
        if k is None or a != k * batch or b != k * other:
            raise ExportError(f"{where}: its per-sample parameter-gradient norms have a constant that changes with "
                              f"the batch size other than in proportion ({a} at {batch}, {b} at {other})")
        if k not in multiples:
            with first.graph.inserting_after(size):
                multiples[k] = first.graph.call_function(operator.mul, (size, k))
        return multiples[k]

    for a, b in zip(nodes, others):
        a.args, a.kwargs = _pairwise(a.args, b.args, free), _pairwise(a.kwargs, b.kwargs, free)
    first.recompile()


def _pairwise(a, b, function):
    """``function`` applied to the matching leaves of two argument structures of the same shape."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return type(a)(_pairwise(x, y, function) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {key: _pairwise(a[key], b[key], function) for key in a}
    return function(a, b)


def per_image(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """[images * rows, ...] as [images, rows, ...]: each image's consecutive rows together."""
    return tensor.reshape(-1, rows, *tensor.shape[1:])


def _one_more_image(tensor: torch.Tensor, rows: int = 1) -> torch.Tensor:
    return torch.cat([tensor, tensor[:rows]])


def _check_batch_free(traced: fx.GraphModule, inputs: list, where: str) -> None:
    """Run the traced norms at another batch size: some of vmap's batching rules (a convolution inside a module
    kept whole, say) read the concrete batch and bake it into the graph, which would then fail on other batches."""
    try:
        with torch.no_grad():
            traced(*inputs)
    except RuntimeError as error:
        raise ExportError(f"{where}: its per-sample parameter-gradient norms trace only at one batch size (a "
                          f"vmap batching rule inside it fixed the batch: {str(error).splitlines()[0][:200]}); "
                          "export without layer_grads, or make the module traceable by torch.fx so that its "
                          "layers get their own rules") from error


def check_traceable(graph_module: fx.GraphModule, call: Call, where: str) -> None:
    """ExportError when a module kept whole cannot be traced into a graph (its forward branches on tensor
    values): the exporter would fail on it later with a less precise message, or a graph would hold one branch."""
    spec = CallSpec(graph_module, call, [])
    flat, _, _ = _example(spec, call)

    def forward(*flat_inputs):
        values, state, _ = spec.rebuild(list(flat_inputs))
        return spec.run(values, state)

    _make_fx(forward, flat, where, "forward graph")
