"""The probe graph in mixed precision, with every precision written in the graph (for strongly typed TensorRT).

TensorRT builds strongly typed networks (the default from TensorRT 11, where the FP16 builder flag is
gone): an engine computes in the types its graph states. So ``--fp16`` is a graph rewrite, done here
with onnx alone (no torch): the convolutions and matrix products of the *forward* pass (the nodes that
``logits`` depends on) take float16 inputs and weights and their results are cast back to float32;
everything else stays float32. The graph's inputs and outputs keep their float32 types.

Why the forward pass only: the backward pass of the probing losses carries small gradients (float16
flushes magnitudes below 6e-8 to zero) and the Gram-form norms multiply sums of squares (float16
overflows past 65504), so those stay in float32, as the norms' reductions do. The forward convolutions
are most of the cost that is safe to halve. The price is stated per output in the TensorRT parity
tests' tolerance table (``tests/runtime/test_tensorrt.py``).
"""
from __future__ import annotations

from gradprobe.base.errors import ExportError

FP16_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def forward_nodes(graph, output: str = "logits") -> set[int]:
    """Indices of the nodes ``output`` depends on (the forward pass of the classifier)."""
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output}
    if output not in producer:
        raise ExportError(f"the graph has no output {output!r} to find its forward pass from")
    found, stack = set(), [output]
    while stack:
        index = producer.get(stack.pop())
        if index is not None and index not in found:
            found.add(index)
            stack.extend(name for name in graph.node[index].input if name)
    return found


def to_fp16(model_bytes: bytes, output: str = "logits") -> bytes:
    """``model_bytes`` with the forward pass's Conv/ConvTranspose/Gemm/MatMul in float16 (see the module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    forward = forward_nodes(graph, output)
    initializers = {init.name: init for init in graph.initializer}
    float_values = {init.name for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    float_values |= {v.name for v in (*graph.input, *graph.value_info)
                     if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    halves, casts, nodes, converted = {}, {}, [], 0

    def half(name: str, index: int) -> str:
        if name in initializers and initializers[name].data_type == TensorProto.FLOAT:
            if name not in halves:
                array = numpy_helper.to_array(initializers[name]).astype("float16")
                halves[name] = numpy_helper.from_array(array, f"{name}__fp16")
            return halves[name].name
        if name not in casts:
            casts[name] = f"{name}__to_fp16"
            nodes.append(helper.make_node("Cast", [name], [casts[name]], name=f"{name}__cast_fp16_{index}",
                                          to=TensorProto.FLOAT16))
        return casts[name]

    for index, node in enumerate(graph.node):
        if index not in forward or node.op_type not in FP16_OPS:
            nodes.append(node)
            continue
        for position, name in enumerate(node.input):
            if name:
                node.input[position] = half(name, index)
        after = []
        for position, name in enumerate(node.output):
            node.output[position] = f"{name}__fp16"
            after.append(helper.make_node("Cast", [node.output[position]], [name], name=f"{name}__cast_fp32",
                                          to=TensorProto.FLOAT))
        nodes.append(node)
        nodes.extend(after)
        converted += 1
    if not converted:
        raise ExportError("the graph's forward pass has no Conv, ConvTranspose, Gemm or MatMul to run in float16")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(halves.values())
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model.SerializeToString()


#: What the float16 graph may differ from the float32 one, per output, as the largest |fp16 - fp32| over the
#: output's largest |fp32| (``layer_grad_sqnorm``: per column, whose scales differ by orders of magnitude);
#: integer outputs: the fraction of samples that differ. Measured on the shipped ResNet with ONNX Runtime
#: running this graph (256 Fashion-MNIST test images): logits 3e-4, probs 8e-4, features 5e-4, gradient
#: norms and maps <= 8e-4, layer_grad_sqnorm 3.5e-2 per column (early layers: ReLU masks flip where a
#: float16 pre-activation rounds across zero), no changed prediction. The bounds leave room for TensorRT's
#: own float16 kernels (other accumulation orders) and for near-tie predictions that flip.
FP16_TOLERANCES = {"logits": 5e-3, "probs": 5e-3, "features": 5e-3, "label_grad_sqnorm": 1e-2,
                   "confounding_grad_sqnorm": 1e-2, "cam": 1e-2, "contrastive_cam": 1e-2, "counterfactual_cam": 1e-2,
                   "gradcam_pp": 1e-2, "layer_grad_sqnorm": 1e-1, "pred": 0.02, "contrast_class": 0.02}


def fp16_errors(fp16: dict, fp32: dict) -> dict[str, float]:
    """Per output of ``FP16_TOLERANCES`` present in both, the error that table bounds."""
    import numpy as np

    errors = {}
    for name in FP16_TOLERANCES:
        if name not in fp16 or name not in fp32:
            continue
        ours, reference = np.asarray(fp16[name]), np.asarray(fp32[name])
        if reference.dtype.kind in "iub":
            errors[name] = float(np.mean(ours != reference))
            continue
        axis = 0 if name == "layer_grad_sqnorm" else None
        scale = np.maximum(np.abs(reference).max(axis=axis), 1e-30)
        errors[name] = float(np.max(np.abs(ours.astype(np.float64) - reference).max(axis=axis) / scale))
    return errors
