"""The GradCon test score as a graph of forward ops only, so ONNX Runtime and TensorRT can run it.

Per sample b, with L_b the pixel MSE of its reconstruction, the graph backpropagates dL_b/d(output) through
the sigmoid and the four transposed convolutions by hand:
- a transposed conv's input gradient is an ordinary convolution of the output gradient with the same
  weight (same stride and padding);
- its weight gradient is G_b[ci, co·k·k] = Σ_t x_b[ci, t] · P_b[co·k·k, t], with x_b the layer input and P_b
  the k×k patches of the output gradient taken with the layer's stride and padding (exactly one patch per
  input position t). The patches come from a one-hot depthwise convolution (im2col in plain ONNX ops).
Then cos_i = G_b·ĝ_i / (max(‖G_b‖, ε)·max(‖ĝ_i‖, ε)), the normality score s = −L + β·mean_i cos_i
(higher = more normal, the authors' sign) and gradprobe's detector score −s (higher = more anomalous).
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradprobe
from gradprobe.base.bundle import write_bundle
from gradprobe.base.errors import ExportError, InputError
from gradprobe.base.manifest import GRADCON_OUTPUTS, GradConSection, InputSpec, Manifest, ModelInfo, TensorSpec
from gradprobe.kernels import ConvSpec

from .gradcon import BETA, COSINE_EPS, GradConCAE, flat_cosine, parameter_count
from .layer_grads import PatchExtractor
from .parity import parity_errors
from .pipeline import GRAPH_FILE, VERIFY_TOLERANCE, WEIGHTS_FILE, export_batch, onnx_bytes, run_exported
from .rules import logistic_parts
from .tensorrt_ops import tensorrt_incompatibilities

OUTPUT_NAMES = GRADCON_OUTPUTS
OUTPUT_MEANINGS = {
    "score": "anomaly score [B] = recon_loss − β·mean(cosine); higher = more anomalous (gradprobe's sign)",
    "normality": "GradCon normality score s [B] = −recon_loss + β·mean(cosine); higher = more normal "
                 "(the authors' sign; score = −normality)",
    "recon_loss": "per-sample pixel MSE of the reconstruction [B]",
    "cosine": "cosine between each decoder weight's per-sample gradient of recon_loss and its stored "
              "training reference [B, decoder weights] (gradcon.decoder_weights in the manifest)",
}


def _spec(layer: nn.ConvTranspose2d) -> ConvSpec:
    """The patch geometry of a transposed conv's weight gradient: k×k windows of its *output* gradient."""
    return ConvSpec(layer.out_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)


class GradConScore(nn.Module):
    """images [B, C, 28, 28] in [0, 1] → (score, normality, recon_loss, cosine), see OUTPUT_MEANINGS."""

    def __init__(self, model: GradConCAE, beta: float = BETA):
        super().__init__()
        if int(model.reference_count) == 0:
            raise ExportError("the GradCon model has no reference gradients: train it first "
                              "(gradprobe train-gradcon)")
        for layer in model.decoder_layers():
            if layer.output_padding != (0, 0) or layer.dilation != (1, 1) or layer.groups != 1:
                raise ExportError("GradConScore supports transposed convs without output padding, "
                                  "dilation or groups")
        model = model.eval()
        self.down = model.down
        self.layers = nn.ModuleList(model.decoder_layers())
        self.patches = nn.ModuleList(PatchExtractor(_spec(layer)) for layer in self.layers)
        self.beta = float(beta)
        for index, reference in enumerate(model.references()):
            unit = reference / reference.norm().clamp_min(COSINE_EPS)
            self.register_buffer(f"unit_{index}", unit.reshape(reference.shape[0], -1).clone())

    def forward(self, images: torch.Tensor):
        inputs, h = [], self.down(images)
        for index, layer in enumerate(self.layers):
            inputs.append(h)
            h = layer(h)
            if index < len(self.layers) - 1:
                h = torch.relu(h)
        h, slope = logistic_parts(h)  # the sigmoid and its derivative without 1 - h (saturated bright pixels)
        residual = h - images
        recon_loss = (residual * residual).flatten(1).mean(dim=1)
        grad = (2.0 / residual[0].numel()) * residual * slope  # dL_b / d(pre-sigmoid)
        cosines = [None] * len(self.layers)
        for index in reversed(range(len(self.layers))):
            layer, x = self.layers[index], inputs[index]
            patches = self.patches[index](grad)[:, 0]                      # [B, Cout·k·k, T]
            weight_grad = x.flatten(2) @ patches.transpose(1, 2)             # [B, Cin, Cout·k·k]
            unit = getattr(self, f"unit_{index}")
            dot = (weight_grad * unit).sum(dim=(1, 2))
            norm = (weight_grad * weight_grad).sum(dim=(1, 2)).sqrt()
            cosines[index] = dot / norm.clamp_min(COSINE_EPS)
            if index > 0:  # through this layer to its input, then through the previous ReLU
                grad = F.conv2d(grad, layer.weight, None, layer.stride, layer.padding) * (x > 0).to(grad.dtype)
        cosine = torch.stack(cosines, dim=1)
        normality = -recon_loss + self.beta * cosine.mean(dim=1)
        return -normality, normality, recon_loss, cosine


def autograd_reference(model: GradConCAE, images: torch.Tensor, beta: float = BETA):
    """The authors' gradcon_score, one sample at a time with autograd: (score, normality, recon_loss, cosine)."""
    model = model.eval()
    losses, cosines = [], []
    for image in images:
        image = image[None]
        loss = F.mse_loss(model(image), image)
        grads = torch.autograd.grad(loss, model.decoder_weights())
        losses.append(loss.detach())
        cosines.append(torch.stack([flat_cosine(g, r) for g, r in zip(grads, model.references())]))
    recon_loss, cosine = torch.stack(losses), torch.stack(cosines)
    normality = -recon_loss + beta * cosine.mean(dim=1)
    return -normality, normality, recon_loss, cosine


def vmap_reference(model: GradConCAE, images: torch.Tensor, beta: float = BETA):
    """The same per-sample score with ``torch.func.vmap(grad)`` (a second, independent oracle)."""
    from torch.func import functional_call, grad, vmap

    model = model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names = model.decoder_weight_names()

    def loss_of(decoder, image):
        image = image[None]
        out = functional_call(model, ({**params, **decoder}, buffers), (image,))
        return F.mse_loss(out, image)

    decoder = {name: params[name] for name in names}
    grads = vmap(grad(loss_of), in_dims=(None, 0))(decoder, images)
    with torch.no_grad():
        out = model(images)
        recon_loss = ((out - images) ** 2).flatten(1).mean(dim=1)
        cosine = torch.stack([F.cosine_similarity(grads[name].flatten(1), ref.reshape(1, -1), dim=1, eps=COSINE_EPS)
                              for name, ref in zip(names, model.references())], dim=1)
    normality = -recon_loss + beta * cosine.mean(dim=1)
    return -normality, normality, recon_loss, cosine


#: Every dimension inside the score graph (channels, sizes, patch lengths): the example batch must differ.
GRAPH_DIMS = (1, 3, 4, 5, 8, 9, 14, 15, 16, 28, 32, 64, 196, 512, 1024)
#: The issue's bound for the deployed score against per-sample autograd (absolute, every output).
AUTOGRAD_TOLERANCE = 1e-4


def _example(example, channels: int) -> torch.Tensor:
    if example is None:
        return torch.rand(4, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    if isinstance(example, np.ndarray):
        example = torch.from_numpy(np.ascontiguousarray(example))
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or tuple(example.shape[1:]) != (channels, 28, 28) \
            or len(example) == 0 or not example.is_floating_point() or not torch.isfinite(example).all():
        raise InputError(f"example_input must be finite float images [N, {channels}, 28, 28] in [0, 1], got "
                         f"{getattr(example, 'dtype', type(example).__name__)} {list(getattr(example, 'shape', []))}")
    return example.detach().float().clamp(0, 1)


def score_onnx(score: GradConScore, example=None, opset: int | None = None) -> tuple[bytes, list[str], torch.Tensor]:
    """The score graph as ONNX bytes with a symbolic batch, its TensorRT parser problems (empty: none) and
    the images it was exported with (the examples cycled, for verification)."""
    example = _example(example, score.layers[-1].out_channels)
    batch = export_batch(example, *GRAPH_DIMS)
    images = example[torch.arange(batch) % len(example)].contiguous()
    options = {} if opset is None else {"opset_version": opset}
    graph, model, _ = onnx_bytes(score, (images,), "the GradCon score graph", input_names=["images"],
                              output_names=list(OUTPUT_NAMES), **options)
    return graph, tensorrt_incompatibilities(model), images


def verify(graph: bytes, manifest: Manifest, model: GradConCAE, score: GradConScore, images: torch.Tensor) -> dict:
    """The exported graph through the runtime engine against the torch module (relative to each output's
    largest value) and against per-sample autograd (absolute); ExportError beyond the tolerances."""
    got = run_exported(graph, manifest, images, what="the GradCon graph")
    if got is None:
        return {}
    with torch.no_grad():
        expected = {name: value.numpy() for name, value in zip(OUTPUT_NAMES, score(images))}
    oracle = {name: value.detach().numpy() for name, value in zip(OUTPUT_NAMES, autograd_reference(model, images))}
    errors = {"torch": parity_errors(got, expected, floor=1e-12, per_output=True),
              "autograd_abs": {name: float(np.abs(got[name] - oracle[name]).max()) for name in OUTPUT_NAMES}}
    bad = {k: v for k, v in errors["torch"].items() if not v <= VERIFY_TOLERANCE}  # NaN too
    bad.update({f"{k} vs autograd": v for k, v in errors["autograd_abs"].items() if not v <= AUTOGRAD_TOLERANCE})
    if bad:
        raise ExportError(f"the exported GradCon graph disagrees with torch beyond tolerance: {bad}")
    return errors


def describe(model: GradConCAE, score: GradConScore, training: dict | None) -> Manifest:
    """The typed manifest of a GradCon bundle."""
    channels = score.layers[-1].out_channels
    shapes = {"score": ("B",), "normality": ("B",), "recon_loss": ("B",), "cosine": ("B", len(score.layers))}
    return Manifest(
        kind="gradcon", input=InputSpec((channels, 28, 28), (0.0, 1.0), (0.0,) * channels, (1.0,) * channels),
        graph=GRAPH_FILE, inputs=(TensorSpec("images", "float32", ("B", channels, 28, 28), "images in [0, 1]"),),
        outputs=tuple(TensorSpec(name, "float32", shapes[name], OUTPUT_MEANINGS[name]) for name in OUTPUT_NAMES),
        section=GradConSection(score.beta, model.decoder_weight_names(), training=dict(training or {})),
        model=ModelInfo(type(model).__name__, parameter_count(model), WEIGHTS_FILE, dict(model.config)),
        files={}, gradprobe_version=gradprobe.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def export_gradcon_bundle(model: GradConCAE, example_input=None, path: str | os.PathLike = "gradcon-bundle", *,
                          beta: float = BETA, opset: int | None = None, training: dict | None = None) -> Path:
    """A GradCon bundle at ``path``: the score graph, the weights with their reference gradients, the manifest.

    ``example_input``: images [N, C, 28, 28] in [0, 1] to export and verify with (default: seeded noise).
    ``training``: what to record about the model (normal class, epochs ...). The threshold comes later,
    from ``gradprobe.load(path).calibrate(...)``. Also reached as ``gradprobe.export(model, example, path)``.
    """
    if not isinstance(model, GradConCAE):
        raise InputError(f"model must be a GradConCAE, got {type(model).__name__}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1e6:
        raise InputError(f"beta must be a number >= 0, got {beta!r}")
    model = model.eval()
    score = GradConScore(model, beta).eval()
    graph, problems, images = score_onnx(score, example_input, opset)
    manifest = describe(model, score, training)
    errors = verify(graph, manifest, model, score, images)
    manifest.export.update({"torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)",
                            "verified_against_torch": errors.get("torch", {}), "verify_tolerance": VERIFY_TOLERANCE,
                            "max_abs_error_vs_autograd": errors.get("autograd_abs", {}),
                            "autograd_tolerance": AUTOGRAD_TOLERANCE, "tensorrt_problems": problems})
    from .checkpoint import checkpoint_bytes

    weights = checkpoint_bytes(model, training=dict(training or {}))
    return write_bundle(path, manifest, {GRAPH_FILE: graph, WEIGHTS_FILE: weights})
