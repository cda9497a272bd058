"""Which ONNX nodes TensorRT's ONNX parser accepts: the probe graph must stay inside this set.

The allow-list is the subset of onnx-tensorrt's supported operators (docs/operators.md of TensorRT 10,
opsets 9 to 20) that a probe graph can need.
Beyond the op type, TensorRT rejects loss ops, MaxPool's indices output and reduce axes that are
not constants, so those are checked too.
"""
from __future__ import annotations

TENSORRT_OPS = frozenset("""
Abs Add And ArgMax ArgMin AveragePool BatchNormalization Cast Clip Concat Constant ConstantOfShape Conv
ConvTranspose Div Einsum Elu Equal Erf Exp Expand Flatten Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity
InstanceNormalization LayerNormalization LeakyRelu Less LessOrEqual Log MatMul Max MaxPool Min Mul Neg Not Or Pad
Pow Range Reciprocal ReduceL1 ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize Selu Shape Sigmoid Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze
Where
""".split())

_REDUCE_WITH_AXES_INPUT = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                           "ReduceL2", "ReduceSumSquare"}


def tensorrt_incompatibilities(model) -> list[str]:
    """Human-readable problems that would stop TensorRT's ONNX parser; empty when none."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    problems = []
    for node in model.graph.node:
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label} is from domain {node.domain!r}")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{label} is not supported by TensorRT's ONNX parser")
        elif node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            problems.append(f"{label} outputs indices")
        elif node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(f"{label} outputs its mean or inverse standard deviation (TensorRT gives only Y)")
        elif node.op_type in _REDUCE_WITH_AXES_INPUT and len(node.input) > 1 and node.input[1] \
                and node.input[1] not in constants:
            problems.append(f"{label} takes its axes from a computed tensor")
    return problems
