"""The model zoo: every torchvision classification model and a set of timm families, exported and checked.

Run in the peers venv (torch 2.14.1 + torchvision 0.29.1 + timm + pytorch-grad-cam)::

    .venv-peers/bin/python benchmarks/zoo.py run                 # resumable: skips models already in the JSON
    .venv-peers/bin/python benchmarks/zoo.py run --only resnet18 timm/convnext_atto
    .venv-peers/bin/python benchmarks/zoo.py floor regnet_x_16gf  # maps from ONNX Runtime's float32 forward
    .venv-peers/bin/python benchmarks/zoo.py exact regnet_x_16gf  # the same probe module run in float64
    .venv-peers/bin/python benchmarks/zoo.py table               # benchmarks/results/zoo.md from the JSON

Each model runs in its own subprocess with a timeout (one export per model: ``layer_grads=True`` gives every
output), random init with non-trivial normalisation statistics (affine parameters drawn at random, then
running statistics from a few train-mode passes on noise), 10 classes, small inputs. Checks, on random
images, against:
- logits: the eager model (ONNX Runtime output);
- maps (Grad-CAM, contrastive, counterfactual, Grad-CAM++): the per-sample autograd reference
  (``ResearchReference``) on the same target, each map relative to its own peak;
- Grad-CAM after upsampling and min-max normalisation: ``pytorch_grad_cam.GradCAM`` on the same layer (the
  traced model with an Identity at the target, and the layout's reshape_transform);
- ``layer_grad_sqnorm``: ``torch.func.vmap(grad)`` per sample in float64 (float32 too; an element passes when
  it agrees with either, as ``tests/export/test_layer_grads.py`` does), samples at a ReLU kink checked on
  both sides (``gradprobe.export.kinks``).
A model that misses also gets its float32 floor (``floor``) and its graph run in float64 (``exact``) in its row.
``ZOO_TRAIN_STEPS=40 zoo.py run --results benchmarks/results/zoo_trained.json --only ...``: the same checks on
models briefly trained on Fashion-MNIST (and checked on its test images); ``table`` lists them beside the
random-init rows.
Self-contained on purpose: the timing harness and peers runner under ``benchmarks/harness`` are being
restructured; the subprocess/resume loop here is what should move onto the runner.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE = 1e-4
#: Models above this size get the maps-only export (every last-layer output and map checked, no per-layer
#: norms): on the shared 2-core machine a layer_grads export and float64 vmap(grad) of a 100 M-parameter model
#: take hours. Every family has a member below it. ZOO_LAYER_GRADS_MAX_PARAMS overrides.
LAYER_GRADS_MAX_PARAMS = int(float(os.environ.get("ZOO_LAYER_GRADS_MAX_PARAMS", 3e7)))
#: ZOO_TRAIN_STEPS=N: N SGD steps on real Fashion-MNIST after the random init, and the checks on Fashion-MNIST
#: test images (the CI's reference models are briefly trained too): random-init networks are badly conditioned
#: in float32.
TRAIN_STEPS = int(os.environ.get("ZOO_TRAIN_STEPS", 0))

#: torchvision models whose smallest accepted input is not 64x64, and builder arguments.
TORCHVISION_SIZES = {"inception_v3": 139, "maxvit_t": 224, "vit_h_14": 56}
TORCHVISION_KWARGS = {"vit_b_16": {"image_size": 64}, "vit_b_32": {"image_size": 64}, "vit_l_16": {"image_size": 64},
                      "vit_l_32": {"image_size": 64}, "vit_h_14": {"image_size": 56},
                      "googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}
#: timm: one small variant per family, with the arguments that make it accept 64x64 inputs.
TIMM_MODELS = {
    "resnet18": "resnet", "resnet26d": "resnet-d (avg-pool downsample)", "resnext26ts": "resnext (timm ts)",
    "efficientnet_b0": "efficientnet", "mobilenetv3_small_100": "mobilenetv3", "regnety_002": "regnet (SE)",
    "regnetx_002": "regnet", "convnext_atto": "convnext", "densenet121": "densenet", "ghostnet_050": "ghostnet",
    "rexnet_100": "rexnet", "cspresnet50": "cspnet", "dla34": "dla", "vgg11_bn": "vgg (conv pre-logits)",
    "lcnet_050": "lcnet", "mixnet_s": "mixnet", "res2net50_14w_8s": "res2net", "skresnet18": "sknet",
    "ecaresnet26t": "eca-resnet", "nf_resnet26": "nfnet (weight-standardised convs)",
    "mobilevit_xxs": "mobilevit", "resnest14d": "resnest", "vit_tiny_patch16_224": "vit",
    "deit_tiny_patch16_224": "deit", "swin_tiny_patch4_window7_224": "swin",
}
TIMM_KWARGS = {"vit_tiny_patch16_224": {"img_size": 64}, "deit_tiny_patch16_224": {"img_size": 64},
               "swin_tiny_patch4_window7_224": {"img_size": 64, "window_size": 4}, "mobilevit_xxs": {}}
TRANSFORMERS = {"maxvit_t", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vit_b_16",
                "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "timm/vit_tiny_patch16_224",
                "timm/deit_tiny_patch16_224", "timm/swin_tiny_patch4_window7_224", "timm/mobilevit_xxs"}


def all_models() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models)) + [f"timm/{n}" for n in TIMM_MODELS]


def family(name: str) -> str:
    if name.startswith("timm/"):
        return "timm " + TIMM_MODELS[name[5:]]
    stem = name.split("_")[0].rstrip("0123456789")
    special = {"wide": "wide_resnet", "efficientnet": "efficientnet" + ("_v2" if "v2" in name else ""),
               "mobilenet": name.rsplit("_", 1)[0] if "_" in name else name}
    return "torchvision " + special.get(stem, stem)


# ------------------------------------------------------------------------------------------ one model
def _build_only(name: str):
    if name.startswith("timm/"):
        import timm

        short = name[5:]
        return timm.create_model(short, pretrained=False, num_classes=10, **TIMM_KWARGS.get(short, {})), 64
    import torchvision.models

    return (torchvision.models.get_model(name, weights=None, num_classes=10, **TORCHVISION_KWARGS.get(name, {})),
            TORCHVISION_SIZES.get(name, 64))


def build(name: str):
    import torch

    torch.manual_seed(0)
    model, size = _build_only(name)
    model = nontrivial_statistics(model, size)
    return (briefly_trained(model, size, TRAIN_STEPS) if TRAIN_STEPS else model), size


def fashion_mnist_rgb(split: str, count: int, size: int, seed: int = 0):
    """``count`` Fashion-MNIST images resized to ``size``, grey in three channels, float32 in [0, 1], and labels."""
    import numpy as np
    import torch

    from gradprobe.data import fashion_mnist

    images, labels = fashion_mnist(split)
    index = np.random.default_rng(seed).permutation(len(images))[:count]
    resized = torch.nn.functional.interpolate(torch.from_numpy(images[index]), size=(size, size), mode="bilinear",
                                              align_corners=False).clamp(0, 1)
    return resized.expand(-1, 3, -1, -1).contiguous().numpy(), labels[index]


def briefly_trained(model, size: int, steps: int, batch: int = 16):
    """``steps`` SGD steps on Fashion-MNIST train images (``fashion_mnist_rgb``), then eval mode: logits spread out
    and normalisation statistics of real images, as in a model in use."""
    import torch

    images, labels = fashion_mnist_rgb("train", steps * batch, size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(images[part])), torch.from_numpy(labels[part]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def nontrivial_statistics(model, size: int):
    """Linear layers initialised to all zeros given nn.Linear's own init; affine normalisation parameters and
    layer scales drawn at random, then BatchNorm running statistics from three train-mode passes on noise
    (cumulative averages), then eval mode."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            # torchvision's ViTs start with an all-zero head: logits that depend on nothing, which a trained
            # model never has (and which gradprobe refuses: "its derivative is zero"); nn.Linear's own init
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.reset_parameters()
        for name, module in model.named_modules():
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
        for name, parameter in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("gamma", "layer_scale", "scale") and parameter.dim() <= 3:
                parameter.copy_(0.5 * torch.rand(parameter.shape, generator=generator) + 0.25)
        momenta = {}
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                momenta[module] = module.momentum
                module.momentum = None
                module.reset_running_stats()
        model.train()
        for _ in range(3):
            model(torch.rand(8, 3, size, size, generator=generator))
        for module, momentum in momenta.items():
            module.momentum = momentum
            # channels that noise barely excites (dead ReLUs) get a variance near zero, and BatchNorm then
            # multiplies their rounding errors by up to 1/sqrt(eps) ~ 300: a model no float32 engine computes
            # to 1e-4. A floor at a tenth of the layer's mean variance keeps the statistics non-trivial.
            floor = 0.1 * module.running_var.mean()
            module.running_var.clamp_(min=float(floor))
    return model.eval()


def vmap_sqnorms(model, x, names, dtype, chunk_budget=2.0e8):
    """Per-sample squared gradient norms of the all-ones BCE loss, torch.func.vmap(grad), in chunks of
    samples small enough that B x P gradients fit in memory."""
    import copy

    import numpy as np
    import torch
    from torch.func import functional_call, grad, vmap

    model = copy.deepcopy(model).to(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def confounding(params, sample):
        z = functional_call(model, (params, buffers), (sample[None],))
        return torch.nn.functional.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="sum")

    total = sum(p.numel() for p in params.values())
    chunk = max(1, int(chunk_budget // max(total, 1)))
    rows = []
    for start in range(0, len(x), chunk):
        part = vmap(grad(confounding), in_dims=(None, 0))(params, x[start:start + chunk].to(dtype))
        rows.append(np.stack([part[n].double().pow(2).flatten(1).sum(1).numpy() for n in names], axis=1))
    return np.concatenate(rows)


def gradcam_peer(hooked, target_name, layout, x, size):
    """pytorch_grad_cam.GradCAM on the same layer (Identity at our target) with our layout as reshape_transform."""
    from pytorch_grad_cam import GradCAM

    def reshape(activation):
        return layout.to_map(activation)

    with GradCAM(model=hooked, target_layers=[hooked.get_submodule(target_name)], reshape_transform=reshape) as cam:
        return cam(input_tensor=x, targets=None)


def _inputs(size: int):
    """The export example [4, 3, size, size] and the checked images [6, ...], the same for every check: random
    images, or Fashion-MNIST test images for briefly trained models."""
    import numpy as np

    if TRAIN_STEPS:
        images, _ = fashion_mnist_rgb("test", 10, size)
        return images[:4], images[4:]
    rng = np.random.default_rng(0)
    return rng.random((4, 3, size, size), dtype=np.float32), rng.random((6, 3, size, size), dtype=np.float32)


def _of_peak(got, expected):
    """Each sample's largest map difference relative to that sample's map peak."""
    import numpy as np

    peak = np.abs(expected).reshape(len(expected), -1).max(axis=1)
    difference = np.abs(got - expected).reshape(len(expected), -1).max(axis=1)
    return difference / np.maximum(peak, 1e-12)


def check(name: str, workdir: Path) -> dict:
    import numpy as np
    import torch

    import gradprobe
    from gradprobe.export.graph import trace
    from gradprobe.export.kinks import check_sqnorms, relative_errors
    from gradprobe.export.reference import ResearchReference

    torch.set_num_threads(1)
    row = {"model": name, "family": family(name), "transformer": name in TRANSFORMERS,
           **({"train_steps": TRAIN_STEPS} if TRAIN_STEPS else {})}
    started = time.perf_counter()
    model, size = build(name)
    row["params"] = int(sum(p.numel() for p in model.parameters()))
    row["input"] = size
    example, images = _inputs(size)
    row["build_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    layer_grads = row["params"] <= LAYER_GRADS_MAX_PARAMS
    row["layer_grads"] = layer_grads
    try:
        bundle = gradprobe.export(model, example, workdir / "bundle", layer_grads=layer_grads)
    except gradprobe.GradprobeError as error:
        row["export"] = False
        row["error"] = f"{type(error).__name__}: {error}"
        return row
    row["export"], row["export_s"] = True, round(time.perf_counter() - started, 1)
    probe = gradprobe.load(bundle)
    section = probe.manifest.classifier
    row["target"] = section.target_layer
    row["target_shape"] = list(section.target_shape)
    forms = list(section.layer_grads.forms) if layer_grads else []
    row["forms"] = {form: forms.count(form) for form in sorted(set(forms))}
    contrast = (np.arange(len(images)) % 11 - 1).astype(np.int64)
    ours = probe.run(images, contrast)
    explained = probe.explain(images, contrast)
    probe.close()  # the references below need the memory (a model over 2 GiB: its weights are held by the engine)

    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    # relative to each sample's largest logit: random-init heads give logits of +-20 beside ones near zero, where
    # an element-wise bound would ask float32 for more than its rounding (torch float32 itself is 5e-4 off float64)
    scale = np.abs(logits).max(axis=1, keepdims=True)
    row["logits_error"] = float((np.abs(ours.logits - logits) / np.maximum(scale, 1e-6)).max())

    graph = trace(model, torch.from_numpy(example), section.target_layer)
    hooked, hook_name = graph.with_target_module()
    hooked64 = copy.deepcopy(hooked).double()
    with torch.no_grad():  # how far float32 torch itself is from float64 on the logits (deep random-init nets)
        logits64 = hooked64(torch.from_numpy(images).double()).numpy()
    row["float32_reference_logits_error"] = float((np.abs(logits - logits64) / np.maximum(scale, 1e-6)).max())
    # float32 autograd is itself ~1e-4 off on some random-init models (a map is a sum over up to 2048 channels
    # that cancel): each check passes when ours is within the bound of the float32 or the float64 reference
    references = [ResearchReference(net, hook_name, section.linear, None, section.maps, layout=graph.layout,
                                    dtype=dtype).run(images, contrast)
                  for net, dtype in ((hooked, torch.float32), (hooked64, torch.float64))]
    map_errors = {}
    for spec in section.maps:
        per_sample = [_of_peak(getattr(ours, spec.name), reference[spec.name]) for reference in references]
        map_errors[spec.name] = float(np.min(per_sample, axis=0).max())
        map_errors[spec.name + "_vs_float64"] = float(per_sample[1].max())
    # what float32 autograd itself is off by (its error against float64): the precision a float32 graph can have
    row["float32_reference_map_errors"] = {}
    for spec in section.maps:
        row["float32_reference_map_errors"][spec.name] = float(
            _of_peak(references[0][spec.name], references[1][spec.name]).max())
    row["map_errors"] = {k: v for k, v in map_errors.items() if not k.endswith("_vs_float64")}
    row["map_errors_vs_float64"] = {k[:-len("_vs_float64")]: v for k, v in map_errors.items()
                                    if k.endswith("_vs_float64")}
    row["empty_cams"] = int((references[1]["cam"].reshape(len(images), -1).max(axis=1) <= 0).sum())

    peak = ours.cam.reshape(len(images), -1).max(axis=1)
    typical = np.median(peak[peak > 0]) if (peak > 0).any() else 0.0
    tiny = peak < 0.05 * typical
    errors, peers = [], []
    for net, dtype in ((hooked, torch.float32), (hooked64, torch.float64)):
        peers.append(gradcam_peer(net, hook_name, graph.layout, torch.from_numpy(images).to(dtype), size))
        errors.append(np.abs(explained.cam - peers[-1]).reshape(len(images), -1).max(axis=1))
    error = np.min(errors, axis=0)
    row["float32_peer_gradcam_error"] = float(np.abs(peers[0] - peers[1]).reshape(len(images), -1)
                                              .max(axis=1)[~tiny].max(initial=0.0))
    row["gradcam_error"] = float(error[~tiny].max(initial=0.0))
    # pytorch-grad-cam divides each map by its range (max - min) after the ReLU: an error of 1e-4 of the peak
    # becomes 1e-4 * peak / (peak - min) there, so that is the same bound on this scale
    raw = np.maximum(references[1]["cam"], 0).reshape(len(images), -1)
    stretch = raw.max(axis=1) / np.maximum(raw.max(axis=1) - raw.min(axis=1), 1e-30)
    row["gradcam_stretch"] = float(stretch[~tiny].max(initial=1.0))
    row["gradcam_error_of_peak"] = float((error / np.maximum(stretch, 1.0))[~tiny].max(initial=0.0))
    row["gradcam_error_vs_float64"] = float(errors[1][~tiny].max(initial=0.0))
    row["gradcam_near_empty"] = int(tiny.sum())
    row["gradcam_near_empty_error"] = float((error * peak)[tiny].max(initial=0) / max(typical, 1e-30))

    if not layer_grads:
        row["ok"] = _passes(row)
        return row
    names = list(section.layer_grads.names)
    x = torch.from_numpy(images)
    started = time.perf_counter()
    references = [vmap_sqnorms(model, x, names, dtype) for dtype in (torch.float32, torch.float64)]
    row["vmap_s"] = round(time.perf_counter() - started, 1)
    verdict = check_sqnorms(model, x, ours.layer_grad_sqnorm, references, names)
    row["layer_grads_error"] = verdict["error"]
    row["float32_reference_layer_grads_error"] = float(relative_errors(references[0], references[1]).max())
    row["kink_samples"] = verdict["kink_samples"]
    row["ok"] = _passes(row)
    return row


def forward_floor(name: str) -> dict:
    """How far each map already is from float64 when computed exactly from ONNX Runtime's float32 forward
    outputs: the bare model exported to ONNX (no gradprobe) gives the target activation and the logits; the map
    is then computed in float64 from that activation, with the prediction P, the runner-up Q and the cotangent
    dS/dz (``TARGETS[...].logit_gradient`` of softmax of those logits, as the probe graph builds it) taken from
    those logits, and the gradient at the target float64 autograd of the logits with that cotangent. The probe
    graph runs on the same float32 forward, its activation and its logits, so a map error of this size is in
    the model before any probe graph."""
    import numpy as np
    import onnxruntime
    import torch

    from gradprobe.export import maps as explanation_maps
    from gradprobe.export.graph import trace

    torch.set_num_threads(1)
    model, size = build(name)
    example, images = _inputs(size)
    graph = trace(model, torch.from_numpy(example))
    hooked, hook_name = graph.with_target_module()
    target = hooked.get_submodule(hook_name)

    class ActivationAndLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.seen = hooked, {}

        def forward(self, x):
            handle = target.register_forward_hook(lambda module, args, output: self.seen.update(a=output))
            try:
                logits = self.net(x)
            finally:
                handle.remove()
            return self.seen.pop("a"), logits

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="zoo-floor-") as folder:  # a file: over 2 GiB the weights lie beside it
        path = str(Path(folder) / "forward.onnx")
        torch.onnx.export(ActivationAndLogits().eval(), (torch.from_numpy(images),), path, dynamo=False)
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {session.get_inputs()[0].name: images})
        del session
    activation_ort, logits_ort = (torch.from_numpy(value).double() for value in outputs)

    exact = copy.deepcopy(hooked).double().eval()
    x = torch.from_numpy(images).double()
    contrast = (np.arange(len(images)) % 11 - 1).astype(np.int64)

    def maps_from(activation=None, ort_logits=None) -> dict:
        """Every map in float64; with ``activation`` and ``ort_logits`` given, the target's activation is replaced
        by ``activation``, and P, Q and the logit cotangent come from ``ort_logits``."""
        out = {spec.name: [] for spec in explanation_maps.MAPS}
        for index in range(len(images)):
            seen = {}

            def swap(module, args, output):
                source = output if activation is None else activation[index:index + 1]
                seen["a"] = source.detach().requires_grad_(True)
                return seen["a"]

            handle = exact.get_submodule(hook_name).register_forward_hook(swap)
            try:
                logits = exact(x[index:index + 1])
            finally:
                handle.remove()
            chosen = logits if ort_logits is None else ort_logits[index:index + 1]
            pred = int(chosen.argmax(1))
            ranked = torch.argsort(chosen[0], descending=True)
            q = int(ranked[1]) if contrast[index] < 0 else int(contrast[index])
            for spec in explanation_maps.MAPS:
                rule = explanation_maps.TARGETS[spec.target]
                if ort_logits is None:
                    grad = torch.autograd.grad(rule.scalar(logits, pred, q), seen["a"], retain_graph=True)[0]
                else:
                    hot = [torch.nn.functional.one_hot(torch.tensor([c]), chosen.shape[1]).double() for c in (pred, q)]
                    cotangent = rule.logit_gradient(torch.softmax(chosen, dim=1), *hot)
                    grad = torch.autograd.grad(logits, seen["a"], cotangent, retain_graph=True)[0]
                value = explanation_maps.weighted_map(spec, graph.layout.to_map(grad),
                                                      graph.layout.to_map(seen["a"].detach()))
                out[spec.name].append(value[0].detach().numpy())
        return {k: np.stack(v) for k, v in out.items()}

    reference, from_ort = maps_from(), maps_from(activation_ort, logits_ort)
    return {key: float(_of_peak(from_ort[key], reference[key]).max()) for key in reference}


def graph_in_float64(name: str, layer_grads: bool) -> dict:
    """The probe graph's own math, without float32: the probe module that the export converts to ONNX, built
    and run in float64 (``gradprobe.export.exact``), against the float64 references of ``check``. Errors near
    float64 rounding mean the graph computes the right function, so a float32 miss is rounding, not a wrong
    graph."""
    import numpy as np
    import torch

    from gradprobe.export.exact import probe_in_float64, references_in_float64, run_in_float64
    from gradprobe.export.kinks import relative_errors

    torch.set_num_threads(1)
    model, size = build(name)
    example, images = _inputs(size)
    probe, graph, norms = probe_in_float64(model, torch.from_numpy(example), layer_grads=layer_grads)
    contrast = (np.arange(len(images)) % 11 - 1).astype(np.int64)
    ours = run_in_float64(probe, norms, images, contrast)
    reference = references_in_float64(model, graph, probe.maps, images, contrast)
    logits = reference["logits"]
    scale = np.abs(logits).max(axis=1, keepdims=True)
    errors = {"logits": float((np.abs(ours["logits"] - logits) / scale).max())}
    for spec in probe.maps:
        errors[spec.name] = float(_of_peak(ours[spec.name], reference[spec.name]).max())
    if layer_grads:
        expected = vmap_sqnorms(model, torch.from_numpy(images), [entry.name for entry in norms], torch.float64)
        errors["layer_grads"] = float(relative_errors(ours["layer_grad_sqnorm"], expected).max())
    return errors


def float32_limited(row: dict) -> bool:
    """A failing row whose every miss (maps, Grad-CAM, layer norms) is within twice the float32 floor of the
    same model and check: float32 autograd's own error against float64, or for maps the error they already
    have when computed exactly from ONNX Runtime's float32 forward, its target activation and logits
    (``forward_floor``), whichever is larger. The graph is float32 too, so that is the precision it can have
    there (reported apart from the passes, not as one)."""
    if not row.get("export") or row.get("ok") or "map_errors" not in row:
        return False
    own, forward = row.get("float32_reference_map_errors") or {}, row.get("ort_forward_map_errors") or {}
    floor = {name: max(own.get(name, 0.0), forward.get(name, 0.0)) for name in row["map_errors"]}
    maps_ok = all(error <= max(TOLERANCE, 2 * floor[name]) for name, error in row["map_errors"].items())
    gradcam = row.get("gradcam_error_of_peak", row.get("gradcam_error", 0.0))
    gradcam_ok = gradcam <= max(TOLERANCE, 2 * row.get("float32_peer_gradcam_error", 0.0), 2 * floor.get("cam", 0.0))
    norms_ok = row.get("layer_grads_error", 0.0) <= max(TOLERANCE, 2 * row.get("float32_reference_layer_grads_error",
                                                                               0.0))
    logits_ok = row["logits_error"] <= max(TOLERANCE, 2 * row.get("float32_reference_logits_error", 0.0))
    others = dict(row, map_errors={name: 0.0 for name in row["map_errors"]}, gradcam_error_of_peak=0.0,
                  layer_grads_error=0.0, logits_error=0.0)
    return bool(maps_ok and gradcam_ok and norms_ok and logits_ok and _passes(others))


def _passes(row: dict) -> bool:
    return bool(row["logits_error"] <= TOLERANCE and max(row["map_errors"].values()) <= TOLERANCE
                and row.get("gradcam_error_of_peak", row["gradcam_error"]) <= TOLERANCE
                and row["gradcam_near_empty_error"] <= TOLERANCE
                and row.get("layer_grads_error", 0.0) <= TOLERANCE)


def one(name: str, out: Path) -> None:
    """One row; a model that misses also gets its float32 floor (``forward_floor``) and its graph run in float64
    (``graph_in_float64``), so the row says by itself whether the miss is float32 rounding."""
    with tempfile.TemporaryDirectory(prefix="zoo-") as folder:
        try:
            row = check(name, Path(folder))
        except Exception as error:  # a crash in the harness or the library: recorded, not hidden
            row = {"model": name, "family": family(name), "export": False, "crash": True,
                   "error": f"{type(error).__name__}: {error}"[:3000], "traceback": traceback.format_exc()[-4000:]}
    row["commit"] = _commit()
    out.write_text(json.dumps(row))  # written first: the row stands if a measurement below runs out of memory
    if row.get("export") and not row.get("ok") and "map_errors" in row:
        for field, measure in (("ort_forward_map_errors", forward_floor),
                               ("float64_graph_errors", lambda n: graph_in_float64(n, bool(row.get("layer_grads"))))):
            try:
                row[field] = measure(name)
            except Exception as error:
                row[field + "_error"] = f"{type(error).__name__}: {error}"[:1000]
        row["float32_limited"] = float32_limited(row)
        out.write_text(json.dumps(row))


def _commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")


# ---------------------------------------------------------------------------------------------- runner
@contextlib.contextmanager
def _locked_rows(results: Path):
    """The JSON's rows, read and written back under a lock (several workers share the file)."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / "gradprobe-zoo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(results.read_text()) if results.exists() else {}
        yield rows
        results.write_text(json.dumps(rows, indent=1, sort_keys=True))


def _update(results: Path, name: str, row: dict) -> None:
    with _locked_rows(results) as rows:
        rows[name] = row


def _amend(results: Path, name: str, **fields) -> None:
    """Add fields to a row already in the JSON."""
    with _locked_rows(results) as rows:
        rows[name].update(fields)


def _size_order(models: list[str]) -> list[str]:
    """Smallest models first (parameter counts from the builders, without running them)."""
    import torch

    counts = {}
    for name in models:
        try:
            with torch.device("meta"):
                model, _ = _build_only(name)
            counts[name] = sum(p.numel() for p in model.parameters())
        except Exception:  # some builders do not run on the meta device: build the small ones for real
            if any(big in name for big in ("128gf", "32gf", "16gf")):
                counts[name] = float("inf")
            else:
                model, _ = _build_only(name)
                counts[name] = sum(p.numel() for p in model.parameters())
    return sorted(models, key=lambda n: counts[n])


def requeue(results: Path, patterns: list[str]) -> None:
    """Drop the rows whose error (or failed check) matches a pattern, so that the next run redoes them."""
    with _locked_rows(results) as rows:
        dropped = [name for name, row in rows.items()
                   if any(p in row.get("error", "") or (p == "mismatch" and row.get("export") and not row.get("ok"))
                          for p in patterns)]
        for name in dropped:
            rows.pop(name)
    print("requeued", dropped)


def run(models: list[str], results: Path, timeout: int, worker: int = 0, workers: int = 1) -> None:
    models = _size_order(models)[worker::workers]
    for name in models:
        done = json.loads(results.read_text()) if results.exists() else {}
        if name in done:
            continue
        started = time.perf_counter()
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            part = Path(handle.name)
        try:
            completed = subprocess.run([sys.executable, __file__, "one", name, str(part)], cwd=ROOT,
                                       timeout=timeout, capture_output=True, text=True)
            if part.stat().st_size:
                row = json.loads(part.read_text())
            else:
                row = {"model": name, "family": family(name), "export": False, "crash": True,
                       "error": f"exit {completed.returncode}: {completed.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            row = {"model": name, "family": family(name), "export": False, "timeout": True,
                   "error": f"timed out after {timeout} s on this 2-core machine"}
        finally:
            part.unlink(missing_ok=True)
        row["wall_s"] = round(time.perf_counter() - started, 1)
        _update(results, name, row)
        print(f"{name}: {'ok' if row.get('ok') else row.get('error', 'mismatch')[:200]} ({row['wall_s']} s)",
              flush=True)


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1e}"


def _not_run(rows: dict) -> list[str]:
    try:
        return [name for name in all_models() if name not in rows and not name.startswith("timm/")]
    except ImportError:  # listing needs torchvision (the peers venv)
        return []


def table(results: Path, out: Path) -> None:
    rows = json.loads(results.read_text())
    lines = ["# Model zoo: export and parity", "",
             "Generated by `benchmarks/zoo.py table` from `zoo.json` (`.venv-peers`: torch 2.14.1, torchvision "
             "0.29.1, timm 1.0.31, pytorch-grad-cam). Random init, 10 classes, non-trivial normalisation "
             "statistics, small inputs, `layer_grads=True`. Errors: logits relative to each sample's largest logit, maps relative to "
             "each map's peak (worst of cam, contrastive, counterfactual, Grad-CAM++ vs autograd), Grad-CAM vs "
             "pytorch_grad_cam after upsampling and normalisation, divided by peak/(peak - min) of the map (the factor "
             "by which that normalisation stretches an error of the peak), layer norms relative (floor 0.1) vs "
             f"vmap(grad) float32/float64. Pass: all <= {TOLERANCE:g}.", ""]
    for group, title in (("torchvision", "torchvision (every classification model of list_models)"),
                         ("timm", "timm (one small model per family)")):
        chosen = {k: v for k, v in rows.items() if v["family"].startswith(group)}
        cnn = {k: v for k, v in chosen.items() if not v.get("transformer")}
        passed = [k for k, v in cnn.items() if v.get("ok")]
        tpassed = [k for k, v in chosen.items() if v.get("transformer") and v.get("ok")]
        limited = [k for k, v in chosen.items() if float32_limited(v)]
        fails = [k for k, v in cnn.items() if v.get("export") and not v.get("ok") and k not in limited]
        refused = [k for k, v in cnn.items() if not v.get("export") and not v.get("timeout") and not v.get("crash")]
        stopped = [k for k, v in chosen.items() if v.get("timeout") or v.get("crash")]
        exact = {k: _float64_error(v) for k, v in chosen.items() if v.get("float64_graph_errors")}
        missed = [k for k, v in chosen.items() if v.get("export") and not v.get("ok")]
        checked = [k for k in missed if k in exact]
        lines += [f"## {title}", "",
                  f"CNNs: **{len(passed)}/{len(cnn)} pass** ({100 * len(passed) / max(len(cnn), 1):.1f} %); "
                  f"{len(passed) + len([k for k in limited if k in cnn])}/{len(cnn)} pass or miss only within twice "
                  f"the float32 floor of the same check: float32 autograd's own error against float64, or for maps "
                  f"the error of maps computed exactly (float64) from ONNX Runtime's float32 plain forward, its target "
                  f"activation and its logits (float32-limited: "
                  f"{', '.join(sorted(k for k in limited if k in cnn)) or 'none'}); other misses: {', '.join(sorted(fails)) or 'none'}; "
                  f"refused by the export: {', '.join(sorted(refused)) or 'none'}; timed out or crashed in the "
                  f"harness: {', '.join(sorted(stopped)) or 'none'}. Transformers: "
                  f"{len(tpassed)}/{len(chosen) - len(cnn)} pass"
                  + (f", float32-limited: {', '.join(sorted(k for k in limited if k not in cnn))}"
                     if any(k not in cnn for k in limited) else "") + ".", "",
                  f"The graph's math apart from float32 (`zoo.py exact`: the same probe module built and run in "
                  f"float64, against float64 autograd): {len(checked)} of the {len(missed)} exported models that "
                  f"miss were checked, worst error {max((exact[k] for k in checked), default=0.0):.1e}"
                  + (f" (not checked: {', '.join(sorted(set(missed) - set(checked)))})" if set(missed) - set(checked)
                     else "") + ".", ""]
        if group == "torchvision":
            left = _not_run(rows)
            lines += [f"Not run yet ({len(left)}): {', '.join(left)}." if left else "Every model was run.", ""]
        lines += [
                  "| model | family | params | input | export | target [K, u, v] | logits | maps | Grad-CAM | "
                  "layer_grads | norm forms | graph in float64 | result |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in sorted(chosen, key=lambda n: (chosen[n]["family"], n)):
            row = chosen[name]
            if not row.get("export"):
                params = f"{row['params'] / 1e6:.1f} M" if row.get("params") else ""
                lines.append(f"| {name} | {row['family']} | {params} | {row.get('input', '')} | no | "
                             f"| | | | | | | {row.get('error', '')[:600].replace('|', '/').replace(chr(10), ' ')} |")
                continue
            forms = ", ".join(f"{k} {v}" for k, v in row.get("forms", {}).items())
            lines.append(f"| {name} | {row['family']} | {row['params'] / 1e6:.1f} M | {row['input']} | yes "
                         f"({row['export_s']:.0f} s) | {row['target']} {row['target_shape']} | "
                         f"{' | '.join(_error_cells(row))} | {forms} | {_fmt(exact.get(name))} | {_result(row)} |")
        lines.append("")
    trained = results.with_name(results.stem + "_trained.json")
    if trained.exists():
        trained_rows = json.loads(trained.read_text())
        lines += _family_section(rows, trained_rows) + _trained_section(trained_rows, rows)
    out.write_text("\n".join(lines) + "\n")


def _float64_error(row: dict) -> float | None:
    return max(row["float64_graph_errors"].values()) if row.get("float64_graph_errors") else None


def _error_cells(row: dict) -> list[str]:
    """The logits, maps, Grad-CAM and layer_grads cells of an exported row."""
    maps = max(row["map_errors"].values()) if row.get("map_errors") else None
    kinks = f" ({row['kink_samples']} at a kink)" if row.get("kink_samples") else ""
    layer_grads = _fmt(row.get("layer_grads_error")) + kinks if row.get("layer_grads") else "not run (size)"
    return [_fmt(row.get("logits_error")), _fmt(maps), _fmt(row.get("gradcam_error_of_peak", row.get("gradcam_error"))),
            layer_grads]


def _result(row: dict) -> str:
    if not row.get("export"):
        return "not exported"
    return "pass" if row.get("ok") else "FAIL (float32-limited)" if float32_limited(row) else "FAIL"


def _family_section(rows: dict, trained: dict) -> list[str]:
    """Random-init outcomes by source, kind and family, and how many pass strictly at random init or once
    briefly trained (two protocols mixed: a summary, not the random-init result)."""
    groups: dict = {}
    for name, row in rows.items():
        source = "timm" if name.startswith("timm/") else "torchvision"
        kind = "transformer" if row.get("transformer") else "CNN"
        groups.setdefault((source, kind, row["family"].removeprefix(source + " ")), []).append(name)
    lines = ["## By family (random init)", "",
             "| source | kind | family | models | strict pass | float32-limited | other miss | refused |",
             "|---|---|---|---|---|---|---|---|"]
    for (source, kind, name), members in sorted(groups.items()):
        cells = []
        for kept in ("FAIL (float32-limited)", "FAIL", "not exported"):
            chosen = sorted(m for m in members if _result(rows[m]) == kept)
            cells.append(f"{len(chosen)} ({', '.join(chosen)})" if chosen else "0")
        strict = sum(_result(rows[m]) == "pass" for m in members)
        lines.append(f"| {source} | {kind} | {name} | {len(members)} | {strict} | {' | '.join(cells)} |")
    lines += ["", "CNNs passing strictly at random init or once briefly trained (`zoo_trained.json`):", ""]
    for source in ("torchvision", "timm"):
        cnns = [n for n, row in rows.items() if not row.get("transformer") and n.startswith("timm/") == (source == "timm")]
        either = [n for n in cnns if rows[n].get("ok") or trained.get(n, {}).get("ok")]
        lines.append(f"- {source} {len(either)}/{len(cnns)} ({100 * len(either) / max(len(cnns), 1):.1f} %; not: "
                     f"{', '.join(sorted(set(cnns) - set(either))) or 'none'}).")
    return lines + [""]


def _trained_section(trained: dict, rows: dict) -> list[str]:
    """The rows of ``zoo_trained.json`` (``ZOO_TRAIN_STEPS``) beside the same models' random-init results."""
    steps = sorted({row.get("train_steps") for row in trained.values()})
    passed = [name for name, row in trained.items() if row.get("ok")]
    missed = [name for name in trained if name in rows and rows[name].get("export") and not rows[name].get("ok")]
    rescued = [name for name in missed if trained[name].get("ok")]
    limited = [name for name in missed if float32_limited(trained[name])]
    others = sorted(set(missed) - set(rescued) - set(limited))
    lines = ["## Briefly trained", "",
             f"The same checks after `ZOO_TRAIN_STEPS={'/'.join(map(str, steps))}`: SGD steps (batch 16) on "
             "Fashion-MNIST train images resized and grey in three channels, then the checks on Fashion-MNIST test "
             "images (the CI's reference models are briefly trained too, `tests/reference_models.py`): random-init "
             "networks are badly conditioned in float32. Run on a subset (the whole zoo takes about 7 hours "
             "here), chiefly the models that miss at random init: "
             f"**{len(passed)}/{len(trained)} pass**; of the {len(missed)} random-init misses among them, "
             f"{len(rescued)} pass strictly once trained"
             + (f", {len(limited)} are float32-limited ({', '.join(sorted(limited))})" if limited else "")
             + (f", other misses: {', '.join(others)}" if others else "") + ".", "",
             "| model | random init | logits | maps | Grad-CAM | layer_grads | graph in float64 | result | commit |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(trained):
        row = trained[name]
        lines.append(f"| {name} | {_result(rows[name]) if name in rows else ''} | {' | '.join(_error_cells(row))} | "
                     f"{_fmt(_float64_error(row))} | {_result(row)} | {row.get('commit', '')} |")
    return lines + [""]


def _measure_each(results: Path, names: list[str], field: str, measure) -> None:
    """``measure(name)`` for each model, printed and stored as ``field`` of its row; a failure is printed and
    the next model goes on."""
    for name in names:
        started = time.perf_counter()
        try:
            errors = measure(name)
        except Exception as error:
            print(name, f"{type(error).__name__}: {error}"[:300], flush=True)
            continue
        print(name, ", ".join(f"{k} {v:.1e}" for k, v in errors.items()),
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        _amend(results, name, **{field: errors})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--only", nargs="*")
    run_parser.add_argument("--timeout", type=int, default=3600)
    run_parser.add_argument("--results", type=Path, default=RESULTS / "zoo.json")
    run_parser.add_argument("--worker", type=int, default=0, help="this worker's index (several share the JSON)")
    run_parser.add_argument("--workers", type=int, default=1)
    one_parser = commands.add_parser("one")
    one_parser.add_argument("name")
    one_parser.add_argument("out", type=Path)
    requeue_parser = commands.add_parser("requeue")
    requeue_parser.add_argument("patterns", nargs="+", help="substrings of errors; 'mismatch' for failed checks")
    requeue_parser.add_argument("--results", type=Path, default=RESULTS / "zoo.json")
    floor_parser = commands.add_parser("floor", help="maps computed exactly from ONNX Runtime's float32 forward "
                                                      "(target activation and logits)")
    floor_parser.add_argument("names", nargs="+")
    floor_parser.add_argument("--results", type=Path, default=RESULTS / "zoo.json")
    exact_parser = commands.add_parser("exact", help="the probe graph's math in float64 against float64 autograd")
    exact_parser.add_argument("names", nargs="+")
    exact_parser.add_argument("--maps-only", action="store_true", help="skip layer_grads (the slow part)")
    exact_parser.add_argument("--results", type=Path, default=RESULTS / "zoo.json")
    table_parser = commands.add_parser("table")
    table_parser.add_argument("--results", type=Path, default=RESULTS / "zoo.json")
    args = parser.parse_args(argv)
    if args.command == "one":
        one(args.name, args.out)
    elif args.command == "floor":
        _measure_each(args.results, args.names, "ort_forward_map_errors", forward_floor)
    elif args.command == "exact":
        rows = json.loads(args.results.read_text())
        _measure_each(args.results, args.names, "float64_graph_errors", lambda name: graph_in_float64(
            name, bool(rows.get(name, {}).get("layer_grads")) and not args.maps_only))
    elif args.command == "requeue":
        requeue(args.results, args.patterns)
    elif args.command == "run":
        run(args.only or all_models(), args.results, args.timeout, args.worker, args.workers)
    else:
        table(args.results, args.results.with_suffix(".md"))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
