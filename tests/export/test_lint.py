"""Every reference model's probe graph, and a zoo subset's, passes NVIDIA's ONNX tools and the TensorRT
operator check (``gradprobe.export.lint``: ``polygraphy check lint``, ``polygraphy surgeon sanitize
--fold-constants``, the ONNX-parser operator list) with no GPU and no TensorRT."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("polygraphy", reason="the lint needs polygraphy: pip install 'gradprobe[lint]'")
pytest.importorskip("onnx_graphsurgeon", reason="the lint needs onnx-graphsurgeon: pip install 'gradprobe[lint]'")

from torch import nn  # noqa: E402

import gradprobe  # noqa: E402
from gradprobe.export.lint import lint_graph  # noqa: E402

from ..reference_models import REFERENCE_MODELS  # noqa: E402
from .test_layer_grads import ConvZoo  # noqa: E402
from .zoo_models import ZOO, make_zoo_model  # noqa: E402


class MBConvNet(nn.Module):
    """The EfficientNet / MobileNetV2 family in miniature: inverted residuals with depthwise convs, SiLU and
    squeeze-excitation (a sigmoid gate from a pooled branch), as the zoo's efficientnet_b0 has them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48),
                                       nn.SiLU())
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 8, 1), nn.SiLU(), nn.Conv2d(8, 48, 1),
                                     nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, 10))

    def forward(self, x):
        x = self.stem(x)
        y = self.depthwise(self.expand(x))
        return self.head(x + self.project(y * self.squeeze(y)))


def _zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ZOO:  # ours, written the way torchvision and timm write theirs; statistics drawn already
        return make_zoo_model(name)
    if name == "conv-zoo":
        model = ConvZoo()
    elif name == "mbconv":
        model = MBConvNet()
    else:
        torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed here (the zoo "
                                                                "runs in .venv-peers)")
        model = getattr(torchvision.models, name)(num_classes=10)
    with torch.no_grad():  # real normalisation statistics, as the zoo draws them
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _check(graph: bytes) -> None:
    report = lint_graph(graph)
    assert report.lint.get("summary", {}).get("passing"), "polygraphy check lint linted no node"
    assert report.ok, "\n".join(report.problems)
    assert report.folded_nodes <= report.nodes


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_reference_probe_graphs_pass_nvidia_lint(name, exported):
    _, bundle = exported(name)
    _check((bundle / "probe.onnx").read_bytes())


def test_deep_probe_graph_passes_nvidia_lint(bundles):
    """The graph with every per-layer norm (Gram forms, taps, ConvTranspose): the largest one."""
    _check((bundles["deep"] / "probe.onnx").read_bytes())


@pytest.mark.parametrize("name", ["conv-zoo", "mbconv", *sorted(ZOO), "resnet18", "efficientnet_b0"])
def test_zoo_probe_graphs_pass_nvidia_lint(name, tmp_path, fmnist_test):
    model = _zoo_model(name)
    channels = 1 if name in ("conv-zoo", "mbconv") else 3
    size = {1: 28, 3: 32 if name in ZOO else 64}[channels]
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    # conv-zoo with every per-layer norm; the others with the maps (the backward to the target layer).
    path = gradprobe.export(model, example, tmp_path / name, layer_grads=name == "conv-zoo")
    _check((path / "probe.onnx").read_bytes())


def test_lint_flags_what_tensorrt_would_reject():
    """A graph whose node cannot run (a shape mismatch only found at run time) and a loss op TensorRT lacks."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"])
    loss = helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [3, 5], [0.0] * 15)
    nodes = [helper.make_node("SoftmaxCrossEntropyLoss", ["x", "labels"], ["loss"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "bad", [x, labels], [loss, y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = lint_graph(model.SerializeToString())
    assert any("SoftmaxCrossEntropyLoss" in p and "TensorRT" in p for p in report.problems)
    assert any("polygraphy check lint" in p for p in report.problems)
