"""Every node of every exported reference model is one TensorRT's ONNX parser accepts."""
import onnx
import pytest

from gradprobe.export.tensorrt_ops import tensorrt_incompatibilities

from ..reference_models import REFERENCE_MODELS


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_probe_graph_uses_only_tensorrt_ops(name, exported):
    _, bundle = exported(name)
    model = onnx.load(str(bundle / "probe.onnx"))
    assert len(model.graph.node) > 20
    assert tensorrt_incompatibilities(model) == []


def test_checker_flags_foreign_ops():
    node = onnx.helper.make_node("SoftmaxCrossEntropyLoss", ["x", "y"], ["loss"])
    pool = onnx.helper.make_node("MaxPool", ["x"], ["p", "indices"], kernel_shape=[2, 2])
    reduce = onnx.helper.make_node("ReduceSum", ["x", "computed_axes"], ["s"])
    graph = onnx.helper.make_graph([node, pool, reduce], "g", [], [])
    problems = tensorrt_incompatibilities(onnx.helper.make_model(graph))
    assert len(problems) == 3
    assert "SoftmaxCrossEntropyLoss" in problems[0] and "indices" in problems[1] and "axes" in problems[2]
