"""The float16 probe graph (for strongly typed TensorRT): forward pass in float16, the rest float32, within
the stated per-output tolerances, checked here with ONNX Runtime running the rewritten graph on the CPU."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from gradprobe import ExportError
from gradprobe.base.bundle import Bundle
from gradprobe.export.fp16 import FP16_OPS, FP16_TOLERANCES, forward_nodes, fp16_errors, to_fp16
from gradprobe.runtime import ProbeEngine, create_backend


@pytest.fixture(scope="module")
def graphs(bundles):
    bundle = Bundle.open(bundles["deep"])
    graph = bundle.read("probe.onnx")
    return bundle, graph, to_fp16(graph)


def test_only_the_forward_pass_is_float16_and_the_interface_is_unchanged(graphs):
    _, graph, half = graphs
    before, after = onnx.load_from_string(graph), onnx.load_from_string(half)
    assert [(v.name, v.type.tensor_type.elem_type) for v in after.graph.input] == \
        [(v.name, v.type.tensor_type.elem_type) for v in before.graph.input]
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    forward = forward_nodes(before.graph)
    heavy = [n for i, n in enumerate(before.graph.node) if n.op_type in FP16_OPS]
    heavy_forward = [n for i, n in enumerate(before.graph.node) if n.op_type in FP16_OPS and i in forward]
    assert 0 < len(heavy_forward) < len(heavy)  # the backward's convolutions stay float32
    halves = [n for n in after.graph.node if n.op_type in FP16_OPS and n.output[0].endswith("__fp16")]
    assert len(halves) == len(heavy_forward)
    assert {i.name for i in after.graph.initializer if i.data_type == TensorProto.FLOAT16}
    casts = [n for n in after.graph.node if n.op_type == "Cast"]
    assert len(casts) > len(halves)
    typed = onnx.shape_inference.infer_shapes(after, strict_mode=True)  # every type in the graph is consistent
    assert len(typed.graph.value_info) > 0


def test_float16_graph_meets_the_stated_tolerances(graphs, fmnist_test):
    bundle, graph, half = graphs
    images = fmnist_test[0][:128]
    contrast = {"contrast": np.full(len(images), -1, np.int64)}
    full = ProbeEngine(create_backend("onnxruntime", graph), bundle.manifest).infer(images, contrast)
    reduced = ProbeEngine(create_backend("onnxruntime", half), bundle.manifest).infer(images, contrast)
    errors = fp16_errors(reduced, full)
    assert set(errors) == set(FP16_TOLERANCES)
    assert all(errors[name] <= FP16_TOLERANCES[name] for name in errors), errors
    assert errors["logits"] > 0  # it did compute in float16


def test_a_graph_without_a_forward_product_is_refused():
    from onnx import helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["logits"])], "g", [x],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2])])
    with pytest.raises(ExportError, match="no Conv"):
        to_fp16(helper.make_model(graph).SerializeToString())
