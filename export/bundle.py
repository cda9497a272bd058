"""``gradprobe.export(model, example, path)``: trace, build the probe graph, export ONNX, verify, write a bundle."""
from __future__ import annotations

import contextlib
import datetime
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradprobe
from gradprobe.bundle import FORMAT, PROBE, SCHEMA_VERSION, SCORE_ORIENTATION, file_record, write_manifest
from gradprobe.errors import ExportError, InputError
from gradprobe.fileio import atomic_directory

from .backward import check_head
from .graph import trace
from .layer_grads import CONFOUNDING_LOSSES, plan as layer_plan
from .probe_module import LAYER_GRADS_OUTPUT, OUTPUTS, ProbeModule
from .tensorrt_ops import tensorrt_incompatibilities

log = logging.getLogger("gradprobe.export")

#: Largest relative difference between ONNX Runtime and the eager probe module accepted at export.
VERIFY_TOLERANCE = 1e-3


def _example_tensor(example) -> torch.Tensor:
    if isinstance(example, np.ndarray):
        example = torch.from_numpy(np.ascontiguousarray(example))
    if not isinstance(example, torch.Tensor):
        raise InputError(f"example_input must be a torch.Tensor or numpy array [N, C, H, W], "
                         f"got {type(example).__name__}")
    if example.dim() != 4 or example.shape[0] == 0:
        raise InputError(f"example_input must have shape [N, C, H, W] with N >= 1, got {list(example.shape)}")
    if not example.is_floating_point():
        raise InputError(f"example_input must be float images in [0, 1], got dtype {example.dtype}")
    if not torch.isfinite(example).all():
        raise InputError("example_input contains NaN or Inf")
    return example.detach().float().cpu()


def _normalization(model: nn.Module, normalize, channels: int):
    if normalize is None:
        normalize = getattr(model, "input_normalization", None)
    if normalize is None:
        return [0.0] * channels, [1.0] * channels
    try:
        mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float64).ravel(), (channels,)) for v in normalize)
    except (TypeError, ValueError) as error:
        raise InputError(f"normalize must be (mean, std) with 1 or {channels} values each, got {normalize!r}") from error
    if (std <= 0).any():
        raise InputError(f"normalize std must be positive, got {std.tolist()}")
    return mean.tolist(), std.tolist()


def _export_batch(example: torch.Tensor, classes: int) -> int:
    """An example batch size equal to no other dimension: otherwise the exporter silently fixes the batch."""
    taken = set(example.shape[1:]) | {classes}
    return next(b for b in (17, 19, 23, 29, 31, 37, 41, 43) if b not in taken)


def _onnx_export(probe: ProbeModule, images: torch.Tensor, contrast: torch.Tensor, path: Path, opset) -> list:
    """Write the ONNX file; return what would stop TensorRT from parsing it (empty when nothing)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    kwargs = dict(dynamo=True, input_names=["images", "contrast"], output_names=probe.output_names(),
                  dynamic_shapes=({0: batch}, {0: batch}), external_data=False, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    chatter = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)  # it warns about torchvision ops we never use
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(probe, (images, contrast), str(path), **kwargs)
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed on the probe graph: {type(error).__name__}: "
                          f"{str(error)[:2000]}") from error
    finally:
        torch_onnx_log.setLevel(level)
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.input:
        first = tensor.type.tensor_type.shape.dim[0]
        if not first.dim_param:
            raise ExportError(f"the exported input {tensor.name!r} has a fixed batch of {first.dim_value}; "
                              "the batch dimension must be symbolic")
    problems = tensorrt_incompatibilities(model)
    if problems:
        warnings.warn(f"the probe graph will not parse in TensorRT: {problems[:3]}", stacklevel=3)
    return problems


def _verify(path: Path, probe: ProbeModule, images: torch.Tensor, contrast: torch.Tensor) -> dict:
    """Max |ORT - torch| / max|torch| per output; ExportError when any exceeds VERIFY_TOLERANCE."""
    try:
        import onnxruntime as ort
    except ImportError:
        warnings.warn("onnxruntime is not installed: the exported probe graph was not verified "
                      "(pip install gradprobe[cpu])", stacklevel=3)
        return {}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "contrast": contrast.numpy()})
    with torch.no_grad():
        expected = [t.numpy() for t in probe(images, contrast)]
    errors = {}
    for name, ours, reference in zip(probe.output_names(), got, expected):
        if reference.dtype.kind == "i":
            errors[name] = float(np.mean(ours != reference))
            continue
        scale = max(float(np.abs(reference).max()), 1e-12)
        errors[name] = float(np.abs(ours - reference).max()) / scale
    bad = {k: v for k, v in errors.items()
           if v > VERIFY_TOLERANCE and k not in ("pred", "contrast_class") and not k.startswith("tap_")}
    if bad:
        raise ExportError(f"the exported graph disagrees with the torch model beyond {VERIFY_TOLERANCE}: {bad}")
    return errors


def _layer_grads_manifest(norms, confounding: str) -> dict:
    return {"confounding": confounding, "names": [entry.name for entry in norms],
            "forms": [entry.form for entry in norms],
            "taps": [{"column": column, "input": f"tap_input_{column}", "grad": f"tap_grad_{column}",
                      "conv": entry.spec.to_dict()} for column, entry in enumerate(norms) if entry.form == "tap"]}


def export_bundle(model: nn.Module, example_input, path: str | os.PathLike, *, target_layer: str | None = None,
                  class_names=None, normalize=None, layer_grads: bool = False, confounding: str = "bce",
                  opset: int | None = None) -> Path:
    """Export ``model`` with its backward-to-last-layer probe graph as a bundle directory at ``path``.

    ``example_input``: a few images [N, C, H, W] in [0, 1] (the shape is what the bundle accepts).
    ``target_layer``: module name whose output the maps explain (default: last convolutional stage).
    ``class_names``: one per logit (default: ``model.class_names`` or "0".."C-1").
    ``normalize``: (mean, std) applied inside the graph (default: ``model.input_normalization``).
    ``layer_grads``: also output ``layer_grad_sqnorm`` [B, P], every parameter tensor's per-sample
    gradient norm for the all-ones ``confounding`` label ("bce" on the logits, or "softmax").
    Returns the bundle path; nothing is left behind on failure.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example = _example_tensor(example_input)
    channels = example.shape[1]
    mean, std = _normalization(model, normalize, channels)
    was_training = model.training
    model.eval()
    try:
        graph = trace(model, (example - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1),
                      target_layer)
        if confounding not in CONFOUNDING_LOSSES:
            raise InputError(f"confounding must be one of {CONFOUNDING_LOSSES}, got {confounding!r}")
        norms = layer_plan(model, graph) if layer_grads else None
        probe = ProbeModule(graph, mean, std, norms, confounding).eval()
        with torch.no_grad():
            env = probe.run_graph(example)
            check_head(graph, env)
            if norms:
                probe(example[:2], torch.full((min(2, len(example)),), -1))  # ExportError names a layer without rule
        logits = env[graph.logits]
        classes, feature_dim = logits.shape[1], env[graph.features].shape[1]
        names = list(class_names if class_names is not None else
                     getattr(model, "class_names", [str(i) for i in range(classes)]))
        if len(names) != classes:
            raise InputError(f"class_names has {len(names)} entries but the model has {classes} classes")
        batch = _export_batch(example, classes)
        images = example[torch.arange(batch) % example.shape[0]].clone()
        images += 0.01 * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
        contrast = torch.arange(batch) % (classes + 1) - 1  # -1 (runner-up) and every class
        with atomic_directory(path) as directory:
            tensorrt_problems = _onnx_export(probe, images, contrast, directory / PROBE, opset)
            errors = _verify(directory / PROBE, probe, images, contrast)
            files = {PROBE: file_record(directory / PROBE)}
            config = getattr(model, "config", None)
            if isinstance(config, dict) and "arch" in config:
                from .checkpoint import save_checkpoint

                save_checkpoint(model, directory / "model.safetensors", normalize=[mean, std], class_names=names)
                files["model.safetensors"] = file_record(directory / "model.safetensors")
            target_shape = list(env[graph.target].shape[1:])
            manifest = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "gradprobe_version": gradprobe.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "model": {"class": type(model).__name__, "config": config,
                          "weights": "model.safetensors" if "model.safetensors" in files else None,
                          "parameters": int(sum(p.numel() for p in model.parameters()))},
                "class_names": names,
                "num_classes": classes,
                "input": {"name": "images", "shape": [None, *example.shape[1:]], "dtype": "float32",
                          "range": [0.0, 1.0], "normalize": {"mean": mean, "std": std}},
                "contrast": {"name": "contrast", "shape": [None], "dtype": "int64",
                             "meaning": "class Q of the contrastive map; -1 = the second most likely class"},
                "target_layer": {"name": graph.target_name, "shape": target_shape},
                "head": {"linear": graph.linear_name, "features": feature_dim},
                "outputs": {**OUTPUTS, **(LAYER_GRADS_OUTPUT if norms else {})},
                "layer_grads": _layer_grads_manifest(norms, confounding) if norms else None,
                "score_orientation": SCORE_ORIENTATION,
                "files": files,
                "export": {"torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)",
                           "verified_against_torch": errors, "tensorrt_problems": tensorrt_problems},
            }
            write_manifest(directory, manifest)
    finally:
        model.train(was_training)
    log.info("exported %s to %s (target layer %s)", type(model).__name__, path, graph.target_name)
    return Path(path)
