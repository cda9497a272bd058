"""Target layers other than the default (backward through convs, pools, residual adds), and export errors."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe import ExportError, InputError
from gradprobe.export.parity import RELATIVE, parity_errors
from gradprobe.export.reference import ResearchReference

from ..reference_models import make_model


@pytest.mark.parametrize("name, target, map_size", [
    ("resnet18-quarter", "layer3", 7),          # head: stride-2 convs, 1x1 shortcut, BN, residual add
    ("vgg", "features.6", 14),                  # head: max-pool (equality mask), conv, BN
    ("mobilenet", "blocks.1", 14),              # head: depthwise stride-2 conv, pointwise conv
])
def test_earlier_target_layer_matches_autograd(name, target, map_size, fmnist_test, tmp_path):
    model = make_model(name)
    bundle = gradprobe.export(model, fmnist_test[0][:2], tmp_path / "b", target_layer=target)
    probe = gradprobe.load(bundle)
    assert probe.manifest.classifier.target_layer == target
    images = np.concatenate([fmnist_test[0][:6], np.zeros((1, 1, 28, 28), np.float32)])  # zeros: max-pool ties
    ours = probe.run(images, contrast=3)
    assert ours.cam.shape == (7, map_size, map_size)
    reference = ResearchReference.for_bundle(model, probe.manifest).run(images, np.full(7, 3))
    errors = parity_errors(ours.as_dict(), reference)
    assert max(errors.values()) <= RELATIVE, errors


class _GeluHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.act(self.hidden(self.flatten(self.pool(self.relu(self.conv(x)))))))


def test_head_layers_export_and_match_autograd(tmp_path):
    """GELU (a hand rule) and SELU (the generic rule) between the target and the logits."""
    torch.manual_seed(0)
    for act in (nn.GELU(), nn.SELU()):
        model = _GeluHead().eval()
        model.act = act
        bundle = gradprobe.export(model, torch.rand(2, 1, 8, 8), tmp_path / type(act).__name__)
        probe = gradprobe.load(bundle)
        images = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
        reference = ResearchReference.for_bundle(model, probe.manifest).run(images, np.full(5, 1))
        assert max(parity_errors(probe.run(images, contrast=1).as_dict(), reference).values()) <= RELATIVE


class _RoundingHead(_GeluHead):
    def forward(self, x):
        return self.fc(torch.round(self.hidden(self.flatten(self.pool(self.relu(self.conv(x)))))))


def test_non_differentiable_head_layer_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"round(_\d+)? \(round\).*derivative is zero.*degenerate"):
        gradprobe.export(_RoundingHead(), torch.rand(2, 1, 8, 8), tmp_path / "b")
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


def test_graph_that_loads_but_fails_to_run_is_an_export_error(tmp_path, monkeypatch):
    """ONNX Runtime's own failure types (a ScatterND of the wrong shape, as the exporter once wrote for timm's
    VGG) become an ExportError at verification, and nothing is written."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from gradprobe.runtime.onnxruntime_backend import OnnxRuntimeBackend

    def fail(self, feeds):
        raise InvalidArgument("Non-zero status code returned while running ScatterND node")

    monkeypatch.setattr(OnnxRuntimeBackend, "_infer", fail)
    with pytest.raises(ExportError, match=r"loads in ONNX Runtime but fails when run.*InvalidArgument.*ScatterND"):
        gradprobe.export(_GeluHead(), torch.rand(2, 1, 8, 8), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_graph_that_onnx_runtime_refuses_is_an_export_error(tmp_path, monkeypatch):
    """A graph ONNX Runtime cannot load (a Transpose of the wrong rank, as the exporter once wrote for Swin's
    shifted-window mask) is the export's failure: an ExportError, not the loader's BundleError."""
    import onnxruntime

    class Refusing:
        def __init__(self, model, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Node (node_Transpose_6322) Op (Transpose) "
                               "[TypeInferenceError] Invalid attribute perm {1, 0}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Refusing)
    with pytest.raises(ExportError, match=r"the probe graph was written but ONNX Runtime cannot load.*perm"):
        gradprobe.export(_GeluHead(), torch.rand(2, 1, 8, 8), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


class _SoftmaxOut(_GeluHead):
    def forward(self, x):
        return torch.softmax(super().forward(x), 1)


def test_logits_must_come_from_linear(tmp_path):
    with pytest.raises(ExportError, match="come from an nn.Linear"):
        gradprobe.export(_SoftmaxOut(), torch.rand(2, 1, 8, 8), tmp_path / "b")


def test_unknown_target_layer(tmp_path):
    with pytest.raises(ExportError, match="'layer9' is not a module"):
        gradprobe.export(make_model("resnet-tiny"), torch.rand(2, 1, 28, 28), tmp_path / "b", target_layer="layer9")


def test_bad_export_arguments(tmp_path):
    model = make_model("resnet-tiny")
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        gradprobe.export(model, torch.rand(1, 28, 28), tmp_path / "b")
    with pytest.raises(InputError, match="class_names has 3 entries"):
        gradprobe.export(model, torch.rand(2, 1, 28, 28), tmp_path / "b", class_names=["a", "b", "c"])
    with pytest.raises(InputError, match="torch.nn.Module"):
        gradprobe.export("model.pt", torch.rand(2, 1, 28, 28), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("example_batch", [1, 10, 28])
def test_batch_is_symbolic_whatever_the_example(example_batch, tmp_path):
    """The example batch may equal the class count or the image size: the export stays dynamic."""
    bundle = gradprobe.export(make_model("resnet-tiny"), torch.rand(example_batch, 1, 28, 28), tmp_path / "b")
    model = onnx.load(str(bundle / "probe.onnx"))
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)
    assert gradprobe.load(bundle).run(np.random.rand(3, 1, 28, 28).astype(np.float32)).cam.shape[0] == 3


def test_identity_normalisation_adds_no_op_on_the_images(tmp_path):
    """mean 0 and std 1: the images go straight into the model (no Sub and Div over every pixel); any other
    normalisation is applied in the graph, and the outputs match autograd either way."""
    model = make_model("resnet-tiny")
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    for normalize, expected in ((([0.0], [1.0]), set()), (([0.2], [0.3]), {"Sub"})):
        bundle = gradprobe.export(model, torch.rand(2, 1, 28, 28), tmp_path / str(normalize[1]), normalize=normalize)
        graph = onnx.load(str(bundle / "probe.onnx")).graph
        readers = {node.op_type for node in graph.node if "images" in node.input}
        assert readers & {"Sub", "Div"} == expected, readers  # (x - mean) first, then / std
        probe = gradprobe.load(bundle)
        reference = ResearchReference.for_bundle(model, probe.manifest).run(images)
        assert max(parity_errors(probe.run(images).as_dict(), reference).values()) <= RELATIVE
