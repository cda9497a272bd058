"""Architectures beyond our reference models export and match autograd.

- default suite (main venv, no torchvision): small models written as torchvision and timm write theirs
  (``zoo_models``: ResNet-D, MobileNetV3, EfficientNet, ConvNeXt, DenseNet/GoogLeNet, ShuffleNet/RegNet, ViT,
  GhostNet, MobileViT, Res2Net, timm VGG's ConvMlp head, Swin's shifted windows and its windows folded into the
  batch, SqueezeNet's conv head), every output against autograd: logits, the four maps per map peak, and
  ``layer_grads=True`` against ``vmap(grad)``;
- ``peers``: real torchvision and timm models through ``benchmarks/zoo.py`` in ``.venv-peers`` (Grad-CAM against
  pytorch_grad_cam too); the full table is ``benchmarks/results/zoo.md``.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import gradprobe
from gradprobe.export.kinks import check_sqnorms
from gradprobe.export.parity import RELATIVE, parity_errors
from gradprobe.export.reference import ResearchReference

from .test_layer_grads import vmap_sqnorms
from .zoo_models import ZOO, make_zoo_model

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = Path(os.environ.get("GRADPROBE_PEERS_PYTHON", ROOT / ".venv-peers" / "bin" / "python"))


@pytest.fixture(scope="module")
def zoo_bundles(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            model = make_zoo_model(name)
            example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            path = gradprobe.export(model, example, tmp_path_factory.mktemp("zoo") / name,
                                    layer_grads=True)
            cache[name] = (model, gradprobe.load(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_autograd(name, zoo_bundles):
    model, probe = zoo_bundles(name)
    images = np.random.default_rng(3).random((6, 3, 32, 32), dtype=np.float32)
    contrast = (np.arange(6) % 11 - 1).astype(np.int64)
    ours = probe.run(images, contrast)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    assert parity_errors({"logits": ours.logits}, {"logits": logits})["logits"] <= RELATIVE
    reference = ResearchReference.for_bundle(model, probe.manifest).run(images, contrast)
    errors = parity_errors(ours.as_dict(), reference)
    assert errors["pred"] == 0 and errors["contrast_class"] == 0
    for key in ("label_grad_sqnorm", "confounding_grad_sqnorm", "features"):
        assert errors[key] <= RELATIVE, (key, errors[key])
    for spec in probe.manifest.classifier.maps:
        expected = reference[spec.name]
        peak = np.abs(expected).reshape(len(images), -1).max(axis=1)
        difference = np.abs(getattr(ours, spec.name) - expected).reshape(len(images), -1).max(axis=1)
        assert (difference <= RELATIVE * peak + 1e-7).all(), (spec.name, (difference / np.maximum(peak, 1e-12)).max())
    assert (reference["cam"].reshape(len(images), -1).max(axis=1) > 0).any(), "every Grad-CAM map is empty"
    layer_grads = probe.manifest.classifier.layer_grads
    names = list(layer_grads.names)
    x = torch.from_numpy(images)
    identity = ([0.0] * 3, [1.0] * 3)
    references = [vmap_sqnorms(model, images, identity, names, dtype=dtype) for dtype in (torch.float32, torch.float64)]
    verdict = check_sqnorms(model, x, ours.layer_grad_sqnorm, references, names)
    assert verdict["error"] <= RELATIVE, verdict


#: float64 checks marked slow (generic rules traced at length); the others take a second or two each
FLOAT64_SLOW = ("mobilevit", "swin")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FLOAT64_SLOW else n
                                  for n in sorted(ZOO)])
def test_probe_module_in_float64_is_exact(name):
    """The graph's math apart from float32 rounding: the same probe module, built and run in float64, equals
    float64 autograd to 1e-9 (maps per peak, logits, every per-layer norm), on any machine and any weights."""
    from gradprobe.export.exact import probe_in_float64, references_in_float64, run_in_float64
    from gradprobe.export.kinks import relative_errors

    model = make_zoo_model(name)
    example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probe, graph, norms = probe_in_float64(model, example, layer_grads=True)
    images = np.random.default_rng(3).random((6, 3, 32, 32), dtype=np.float32)
    contrast = (np.arange(6) % 11 - 1).astype(np.int64)
    ours = run_in_float64(probe, norms, images, contrast)
    reference = references_in_float64(model, graph, probe.maps, images, contrast)
    logits = reference["logits"]
    assert np.abs(ours["logits"] - logits).max() <= 1e-9 * np.abs(logits).max()
    for spec in probe.maps:
        peak = np.abs(reference[spec.name]).reshape(6, -1).max(axis=1)
        difference = np.abs(ours[spec.name] - reference[spec.name]).reshape(6, -1).max(axis=1)
        assert (difference <= 1e-9 * peak + 1e-15).all(), (spec.name, (difference / peak).max())
    identity = ([0.0] * 3, [1.0] * 3)
    expected = vmap_sqnorms(model, images, identity, [entry.name for entry in norms], dtype=torch.float64)
    assert relative_errors(ours["layer_grad_sqnorm"], expected).max() <= 1e-9


def test_forms_cover_every_kind_of_parameter(zoo_bundles):
    """ConvNeXt: the depthwise conv weight in Gram or tap form, the channels-last Linear as a 1x1 convolution,
    LayerNorm and the layer scale generic; EfficientNet: the BatchNorm subclass with its activation generic."""
    _, probe = zoo_bundles("convnext")
    forms = dict(zip(probe.manifest.classifier.layer_grads.names, probe.manifest.classifier.layer_grads.forms))
    assert forms["block1.gamma"] == "generic" and forms["block1.norm.weight"] == "generic"
    assert forms["stem_norm.weight"] == "generic" and forms["block1.pwconv1.weight"] in ("gram", "tap")
    assert forms["block1.pwconv1.bias"] == "closed" and forms["block1.dwconv.weight"] in ("gram", "tap")
    _, probe = zoo_bundles("efficientnet")
    forms = dict(zip(probe.manifest.classifier.layer_grads.names, probe.manifest.classifier.layer_grads.forms))
    assert forms["bn1.weight"] == "generic" and forms["bn3.weight"] == "closed" and forms["se.fc1.bias"] == "closed"



def test_windows_folded_into_the_batch(zoo_bundles):
    """Swin's windows folded into the batch: the score bias (an add on the folded rows) goes through the generic
    rule over each image's windows, the Linears on them through the per-position forms over all of an image's
    positions (their norms match vmap(grad) in test_zoo_model_matches_autograd)."""
    _, probe = zoo_bundles("swin_windows")
    forms = dict(zip(probe.manifest.classifier.layer_grads.names, probe.manifest.classifier.layer_grads.forms))
    assert forms["attention.bias"] == "generic" and forms["attention.qkv.weight"] in ("gram", "tap")


def test_windows_folded_out_of_image_order_are_refused(tmp_path):
    """Rows folded window by window (every image's first window, then every image's second): an image's rows
    are not consecutive, which the export checks instead of assuming."""
    from gradprobe.base.errors import ExportError

    from .zoo_models import WindowSwinIsh

    model = WindowSwinIsh(image_major=False).eval()
    example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ExportError, match=r"attention.*folds 4 rows per image.*not as each image's consecutive rows"):
        gradprobe.export(model, example, tmp_path / "b", layer_grads=True)
    assert not (tmp_path / "b").exists()


def test_squeezenet_head_reads_each_class_own_positions(zoo_bundles):
    """SqueezeNet has no Linear: its last layer is the 1x1 conv whose rectified map is averaged. The default
    target is the fire modules' output (before the classifier, not its Dropout); the closed-form norms read each
    class's own features (matched against autograd in test_zoo_model_matches_autograd), which differ from the
    pooled features wherever a class's map is positive at some positions only."""
    from gradprobe.export.graph import trace

    model, probe = zoo_bundles("squeezenet")
    section = probe.manifest.classifier
    assert (section.target_layer, section.linear) == ("features", "classifier.1")
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    graph = trace(model, images)
    interpreter = torch.fx.Interpreter(graph.module, garbage_collect_values=False)
    interpreter.run(images)
    terms = graph.head.terms(graph, dict(interpreter.env), bias=True)
    pooled = terms.features.pow(2).sum(dim=1, keepdim=True)
    assert (terms.weight_sqnorm - pooled).abs().max() > 0.1 * pooled.max()


def test_squeezenet_head_refusals(tmp_path):
    """Contrastive features need one h for every class; a target after the last layer is named as such; a head
    that is not what its pattern says (here: read as if the ReLU were absent) fails the export's check."""
    import dataclasses

    from gradprobe.base.errors import ExportError
    from gradprobe.export.graph import trace
    from gradprobe.export.heads import PooledConvHead

    model = make_zoo_model("squeezenet")
    example = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ExportError, match=r"contrastive features .* 'classifier.1' is a 1x1 Conv2d -> ReLU"):
        gradprobe.export(model, example, tmp_path / "b", contrastive="compact")
    with pytest.raises(ExportError, match=r"target layer 'classifier.2' lies after the last layer 'classifier.1'"):
        gradprobe.export(model, example, tmp_path / "b", target_layer="classifier.2")
    assert not (tmp_path / "b").exists()
    graph = trace(model, example)
    graph = dataclasses.replace(graph, head=PooledConvHead(relu=False))
    interpreter = torch.fx.Interpreter(graph.module, garbage_collect_values=False)
    interpreter.run(example)
    with pytest.raises(ExportError, match=r"logits are not 1x1 Conv2d -> global average pooling of 'classifier.1'"):
        graph.head.check(graph, dict(interpreter.env))


def test_vit_map_is_on_the_token_grid(zoo_bundles):
    """The last blocks reach the logits only through the class token: the map is taken where patch tokens
    still matter (the last block's norm1, as pytorch-grad-cam advises for ViTs), on the 4x4 patch grid."""
    _, probe = zoo_bundles("vit")
    section = probe.manifest.classifier
    assert section.target_layer == "blocks.1.norm1" and tuple(section.target_shape) == (16, 4, 4)


@pytest.mark.peers
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
                                  "shufflenet_v2_x0_5", "convnext_tiny", "regnet_y_400mf", "timm/convnext_atto",
                                  "timm/resnet26d", "timm/vit_tiny_patch16_224"])
def test_real_models_in_peers_venv(name, tmp_path):
    """One row of ``benchmarks/zoo.py`` per model: export, logits, maps, Grad-CAM vs pytorch_grad_cam, norms, each
    within 1e-4; a miss passes only when it is within twice the float32 floor of that check (float32 autograd's
    own error, maps from ONNX Runtime's float32 forward) and the same graph run in float64 is within 1e-9."""
    if not PEERS_PYTHON.exists():
        pytest.skip(f"peers venv not found at {PEERS_PYTHON}: run `make peers` (or set GRADPROBE_PEERS_PYTHON)")
    out = tmp_path / "row.json"
    completed = subprocess.run([str(PEERS_PYTHON), str(ROOT / "benchmarks" / "zoo.py"), "one", name, str(out)],
                               capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-2000:]
    row = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in row.items() if k != "traceback"}))
    assert row.get("export"), row.get("error") or row
    if not row.get("ok"):  # random-init models whose float32 autograd is itself ~1e-4 off float64
        exact = max((row.get("float64_graph_errors") or {"missing": float("inf")}).values())
        assert row.get("float32_limited") and exact <= 1e-9, (
            "misses beyond twice the float32 floor, or the graph is not exact in float64", row)
