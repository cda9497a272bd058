"""The tracer on its own: leaves, the head, layouts, the default target, naming targets, and the bad cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe import ExportError
from gradprobe.export.graph import trace

from .zoo_models import make_zoo_model


def _trace(model, size=32, **options):
    return trace(model.eval(), torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)), **options)


class TimmLinear(nn.Linear):
    """timm's Linear: a subclass torch.fx would otherwise trace into F.linear."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class SubclassHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = TimmLinear(4, 5)
        self.flatten = nn.Identity()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.flatten(self.drop(self.fc(F.relu(self.conv(x)).mean((2, 3)))))


def test_subclass_of_a_torch_layer_is_a_leaf_and_the_head_passes_identity():
    graph = _trace(SubclassHead())
    assert graph.linear_name == "fc" and graph.linear.op == "call_module"
    assert graph.logits.target == "flatten" and graph.features is graph.linear.args[0]


class ShapeArithmetic(nn.Module):
    """A submodule whose forward does Python arithmetic on shapes (timm's pad_same): fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        pad = max((-(x.shape[-1] // -2) - 1) * 2 + 3 - x.shape[-1], 0)
        if pad > 0:
            x = F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return self.conv(x)


class WithShapeArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ShapeArithmetic()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(torch.relu(self.stem(x)))).mean((2, 3)))


def test_untraceable_submodule_becomes_a_leaf(tmp_path):
    graph = _trace(WithShapeArithmetic())
    assert "stem" in {n.target for n in graph.module.graph.nodes if n.op == "call_module"}
    gradprobe.export(WithShapeArithmetic().eval(), torch.rand(2, 3, 32, 32), tmp_path / "b", layer_grads=True)


def test_in_place_calls_do_not_touch_the_users_model():
    model = make_zoo_model("resnet_d")
    graph = _trace(model)
    assert model.relu.inplace is True and graph.module.relu.inplace is False


def test_channels_last_head_is_not_the_target():
    """ConvNeXt: the permute after global pooling is a 1x1 channels-last map; the target is the last stage."""
    graph = _trace(make_zoo_model("convnext"))
    assert graph.target_name == "block2" and graph.layout.kind == "nchw"
    permutes = [n for n in graph.module.graph.nodes if n.op == "call_method" and n.target == "permute"]
    assert graph.layouts[permutes[-1]].kind == "nhwc" and graph.layouts[permutes[-1]].spatial(
        permutes[-1].meta["tensor_meta"].shape) == (1, 1)


def test_channels_last_target_is_transposed():
    graph = _trace(make_zoo_model("convnext"), target_layer="block2.norm")
    assert graph.layout.kind == "nhwc"
    value = torch.rand(2, 4, 4, 16)
    assert torch.equal(graph.map_of(value), value.permute(0, 3, 1, 2))


def test_concatenation_target_is_named_by_its_module():
    graph = _trace(make_zoo_model("densenet_googlenet"))
    assert graph.target_name == "inception" and graph.target.target is torch.cat


def test_functional_target_is_named_by_its_node(tmp_path):
    graph = _trace(make_zoo_model("shufflenet_regnet"))
    assert graph.target_name == "relu_1" and graph.target.target is F.relu
    named = _trace(make_zoo_model("shufflenet_regnet"), target_layer="node:cat")
    assert named.target.target is torch.cat


def test_vit_tokens_are_a_grid():
    graph = _trace(make_zoo_model("vit"))
    assert graph.layout.kind == "tokens" and graph.layout.grid == (4, 4) and graph.layout.prefix == 1
    assert graph.target_name == "blocks.1.norm1"
    explicit = _trace(make_zoo_model("vit"), target_layer="blocks.0", grid=(4, 4))
    assert explicit.layout.prefix == 1


def test_unknown_target_lists_candidates_with_shapes():
    with pytest.raises(ExportError, match=r"candidates .*block2 \[2, 16, 4, 4\] NCHW"):
        _trace(make_zoo_model("convnext"), target_layer="nope")


def test_post_pooling_target_warns():
    with pytest.warns(UserWarning, match="1x1 map"):
        _trace(make_zoo_model("densenet_googlenet"), target_layer="node:adaptive_avg_pool2d")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc(h), self.aux(h)


def test_several_outputs_are_refused_clearly():
    with pytest.raises(ExportError, match="returns 2 outputs .*main head"):
        _trace(TwoHeads())


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.conv(x)
        if x.mean() > 0:  # data-dependent control flow in the model's own forward
            x = x * 2
        return self.fc(x.mean((2, 3)))


class BranchingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.amax() > 0 else -self.conv(x)


class WithBranchingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.block = BranchingBlock()
        self.head = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.head(torch.relu(self.block(self.stem(x))))).mean((2, 3)))


class Rounding(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.round(self.conv(x) * 4)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


def test_data_dependent_control_flow_in_forward_is_named(tmp_path):
    with pytest.raises(ExportError, match="Branching.forward.*control flow"):
        gradprobe.export(Branching().eval(), torch.rand(2, 3, 16, 16), tmp_path / "b")


def test_data_dependent_control_flow_in_a_block_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"block \(BranchingBlock\).*data-dependent control flow"):
        gradprobe.export(WithBranchingBlock().eval(), torch.rand(2, 3, 16, 16), tmp_path / "b", layer_grads=True)


def test_non_differentiable_call_on_the_path_is_named(tmp_path):
    gradprobe.export(Rounding().eval(), torch.rand(2, 3, 16, 16), tmp_path / "maps")  # round before the target
    with pytest.raises(ExportError, match=r"round.*zero gradient.*degenerate"):
        gradprobe.export(Rounding().eval(), torch.rand(2, 3, 16, 16), tmp_path / "deep", layer_grads=True)
    with pytest.raises(ExportError, match=r"round.*zero gradient.*degenerate"):
        gradprobe.export(Rounding().eval(), torch.rand(2, 3, 16, 16), tmp_path / "early", target_layer="conv")


class ConvHeadNet(nn.Module):
    """timm's DLA head: global pooling, then a 1x1 Conv2d as the classifier, then flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(12, 5, 1)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        return self.flatten(self.fc(self.global_pool(self.features(x))))


def test_pointwise_conv_classifier_is_read_as_a_linear(tmp_path):
    """The 1x1 conv on the pooled map is the last Linear (sharing its parameters; the user's model keeps its
    conv): logits, maps and per-layer norms (``fc.weight`` included) match autograd and vmap(grad)."""
    from gradprobe.export.kinks import check_sqnorms
    from gradprobe.export.reference import ResearchReference

    from .test_layer_grads import vmap_sqnorms

    torch.manual_seed(0)
    model = ConvHeadNet().eval()
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)).numpy()
    probe = gradprobe.load(gradprobe.export(model, images[:4], tmp_path / "b", layer_grads=True))
    section = probe.manifest.classifier
    assert section.linear == "fc" and isinstance(model.fc, nn.Conv2d) and model.fc.weight.dim() == 4
    ours = probe.run(images)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    assert abs(ours.logits - logits).max() <= 1e-5 * abs(logits).max()
    reference = ResearchReference.for_bundle(model, probe.manifest).run(images)
    for name in ("cam", "contrastive_cam", "label_grad_sqnorm", "confounding_grad_sqnorm"):
        expected = reference[name]
        assert abs(getattr(ours, name) - expected).max() <= 1e-4 * abs(expected).max(), name
    names = list(section.layer_grads.names)
    assert "fc.weight" in names
    references = [vmap_sqnorms(model, images, ((0.0,), (1.0,)), names, dtype=dtype)
                  for dtype in (torch.float32, torch.float64)]
    verdict = check_sqnorms(model, torch.from_numpy(images), ours.layer_grad_sqnorm, references, names)
    assert verdict["error"] <= 1e-4, verdict


class StdConv2d(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-ResNet): the weight standardised per output channel by ``F.batch_norm`` in
    training mode without running statistics, times a learned gain, then the convolution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1) * 1.5)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding)


class WeightStandardisedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv2d(3, 6, 7, 2, 3)  # a 7x7 kernel: 7 is also the first batch size the tracer would try
        self.act = nn.ReLU()
        self.conv = StdConv2d(6, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(self.act(self.stem(x)))).mean((2, 3)))


def test_weight_standardised_convs_have_per_sample_norms(tmp_path):
    """NF-ResNet's convolutions: their norms (weight, bias and gain, through the standardisation) come from the
    generic rule, one graph for every batch size, and match vmap(grad). Its 7x7 stem once made the tracer pick
    7 as a batch size, which duck sizing tied to the kernel's size (two traces, two different graphs)."""
    from gradprobe.export.kinks import check_sqnorms

    from .test_layer_grads import vmap_sqnorms

    torch.manual_seed(0)
    model = WeightStandardisedNet().eval()
    images = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(1)).numpy()
    probe = gradprobe.load(gradprobe.export(model, images[:4], tmp_path / "b", layer_grads=True))
    names = list(probe.manifest.classifier.layer_grads.names)
    assert {"stem.gain", "conv.weight"} <= set(names)
    ours = probe.run(images).layer_grad_sqnorm
    references = [vmap_sqnorms(model, images, ((0.0,), (1.0,)), names, dtype=dtype)
                  for dtype in (torch.float32, torch.float64)]
    verdict = check_sqnorms(model, torch.from_numpy(images), ours, references, names)
    assert verdict["error"] <= 1e-4, verdict
