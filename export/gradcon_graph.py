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

import contextlib
import io
import logging
import os
import warnings
import torch
import torch.nn.functional as F
from torch import nn

from gradprobe.errors import ExportError, InputError
from gradprobe.fileio import atomic_path
from gradprobe.kernels import ConvSpec

from .gradcon import BETA, COSINE_EPS, GradConCAE, flat_cosine
from .layer_grads import PatchExtractor
from .tensorrt_ops import tensorrt_incompatibilities

OUTPUT_NAMES = ("score", "normality", "recon_loss", "cosine")
OUTPUT_MEANINGS = {
    "score": "anomaly score [B] = recon_loss − β·mean(cosine); higher = more anomalous (gradprobe's sign)",
    "normality": "GradCon normality score s [B] = −recon_loss + β·mean(cosine); higher = more normal "
                 "(the authors' sign; score = −normality)",
    "recon_loss": "per-sample pixel MSE of the reconstruction [B]",
    "cosine": "cosine between each decoder weight's per-sample gradient of recon_loss and its stored "
              "training reference [B, 4] (up.0, up.2, up.4, up.6)",
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
            h = torch.relu(h) if index < len(self.layers) - 1 else torch.sigmoid(h)
        residual = h - images
        recon_loss = (residual * residual).flatten(1).mean(dim=1)
        grad = (2.0 / residual[0].numel()) * residual * h * (1 - h)  # dL_b / d(pre-sigmoid)
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
    names = [f"up.{i}.weight" for i in range(0, len(model.up), 2)]

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


def _export_batch(images: torch.Tensor) -> int:
    """An example batch equal to no other dimension of the graph, or the exporter fixes the batch silently."""
    taken = set(images.shape[1:]) | {1, 3, 4, 5, 8, 9, 14, 15, 16, 28, 32, 64}
    return next(b for b in (17, 19, 23, 29, 31, 37) if b not in taken)


def export_gradcon_onnx(score: GradConScore, path: str | os.PathLike, example: torch.Tensor | None = None,
                        opset: int | None = None) -> list[str]:
    """Write the score graph with a symbolic batch; return what would stop TensorRT parsing it (empty: none)."""
    channels = score.layers[-1].out_channels
    if example is None:
        example = torch.rand(1, channels, 28, 28, generator=torch.Generator().manual_seed(0))
    if example.ndim != 4 or example.shape[1:] != (channels, 28, 28):
        raise InputError(f"example must be [N, {channels}, 28, 28], got {list(example.shape)}")
    batch = _export_batch(example)
    images = example.float().repeat((batch + len(example) - 1) // len(example), 1, 1, 1)[:batch]
    kwargs = dict(dynamo=True, input_names=["images"], output_names=list(OUTPUT_NAMES),
                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},),
                  external_data=False, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    import onnx

    with atomic_path(path) as temporary:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(score, (images,), str(temporary), **kwargs)
        except Exception as error:
            raise ExportError(f"torch.onnx.export failed on the GradCon score graph: {type(error).__name__}: "
                              f"{str(error)[:2000]}") from error
        finally:
            log.setLevel(level)
        model = onnx.load(str(temporary))
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        if not first.dim_param:
            raise ExportError(f"the exported GradCon graph has a fixed batch of {first.dim_value}; "
                              "it must be symbolic")
    return tensorrt_incompatibilities(model)
