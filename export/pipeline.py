"""``gradprobe.export(model, example, path)`` in six steps: prepare, trace, build, export, verify, write.

- prepare: check the arguments, put the model in eval mode, settle normalisation and class names;
- trace: torch.fx graph of the model, its target layer and last Linear (``graph.trace``);
- build: the probe module (forward + probing losses' backward as forward ops), run once so a layer
  without a backward rule is named now;
- export: ``torch.onnx.export(dynamo=True)`` with a symbolic batch, checked against TensorRT's parser;
- verify: the exported graph through the runtime's engine beside the torch module, on the same inputs;
- write: the bundle, atomically, with its typed manifest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gradprobe
from gradprobe.base.bundle import write_bundle
from gradprobe.base.errors import BundleError, ExportError, GradprobeError, InputError
from gradprobe.base.manifest import (CONFOUNDING_LOSSES, ClassifierSection, ContrastiveFeatures,
                                     InputSpec, LayerGrads, Manifest, ModelInfo, Tap, TensorSpec)

from .contrastive import variants_of
from .graph import ProbeGraph, trace
from .layer_grads import plan as layer_plan
from . import kinks
from .parity import parity_errors
from .probe_module import OrderedOutputs, ProbeModule
from .tensorrt_ops import tensorrt_incompatibilities
from .weights_apart import move_weights_apart

log = logging.getLogger("gradprobe.export")

#: Largest difference between ONNX Runtime and the eager probe module accepted at export, relative to
#: each output's largest value.
VERIFY_TOLERANCE = 1e-3
#: A sample with an activation within rounding of a kink may get the other one-sided derivative in ONNX
#: Runtime (see ``kinks``): its gradient outputs may then differ by up to this much (relative to the output's
#: largest value). Large inputs have such samples nearly always: ResNet-50 at 224x224 moved 1.2 %.
KINK_TOLERANCE = 5e-2
GRAPH_FILE = "probe.onnx"
PROTOBUF_LIMIT = 2 ** 31 - 2 ** 26  # 2 GiB less room for the graph itself
#: Models whose parameters and buffers take more bytes than this keep the graph's weights beside it.
WEIGHTS_APART_ABOVE = PROTOBUF_LIMIT
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Prepared:
    """The checked arguments of one export."""

    model: nn.Module
    example: torch.Tensor       # [N, C, H, W] in [0, 1]
    mean: list
    std: list
    weight_bytes: int = 0       # parameters and buffers

    @property
    def weights_apart(self) -> bool:
        return self.weight_bytes > WEIGHTS_APART_ABOVE

    def normalized(self) -> torch.Tensor:
        return (self.example - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------- prepare
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
    return example.detach().float().cpu().clamp(0, 1)


def _normalization(model: nn.Module, normalize, channels: int):
    if normalize is None:
        normalize = getattr(model, "input_normalization", None)
    if normalize is None:
        return [0.0] * channels, [1.0] * channels
    try:
        mean, std = (np.broadcast_to(np.asarray(v, dtype=np.float64).ravel(), (channels,)) for v in normalize)
    except (TypeError, ValueError) as error:
        raise InputError(f"normalize must be (mean, std) with 1 or {channels} values each, got {normalize!r}") from error
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise InputError(f"normalize needs finite means and positive stds, got {normalize!r}")
    return mean.tolist(), std.tolist()


def prepare(model, example_input, normalize) -> Prepared:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    example = _example_tensor(example_input)
    mean, std = _normalization(model, normalize, example.shape[1])
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return Prepared(model, example, mean, std, weights)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------- build
def build(prepared: Prepared, graph: ProbeGraph, layer_grads: bool, confounding: str, contrastive: tuple = (),
          hand_rules: bool = True):
    """The probe module, its layer-norm plan and the outputs of one eager run on the example."""
    if confounding not in CONFOUNDING_LOSSES:
        raise InputError(f"confounding must be one of {CONFOUNDING_LOSSES}, got {confounding!r}")
    norms = layer_plan(prepared.model, graph) if layer_grads else None
    # the backward of every call is planned here: a hand rule, or the generic rule traced now (ExportError
    # names a call that cannot be differentiated)
    probe = ProbeModule(graph, prepared.mean, prepared.std, norms, confounding, contrastive=contrastive,
                        example=prepared.normalized()[:4], hand_rules=hand_rules).eval()
    with torch.no_grad():
        example = prepared.example[:2]
        outputs = probe(example, torch.full((len(example),), -1))
    return probe, norms, outputs


def export_batch(example: torch.Tensor, *other_dims: int) -> int:
    """An example batch size equal to no other dimension: otherwise the exporter silently fixes the batch."""
    taken = set(example.shape[1:]) | set(other_dims)
    return next(b for b in (17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61) if b not in taken)


def probe_inputs(example: torch.Tensor, classes: int, avoid=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Export and verification inputs: the examples, cycled and jittered, and every contrast class.
    ``avoid``: sizes of the probe's activations, which the batch must not equal either."""
    batch = export_batch(example, classes, *avoid)
    images = example[torch.arange(batch) % example.shape[0]].clone()
    images += 0.01 * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    contrast = torch.arange(batch) % (classes + 1) - 1  # -1 (runner-up) and every class
    return images.clamp_(0, 1), contrast


# -------------------------------------------------------------------------------------------- export
def onnx_bytes(module: nn.Module, args: tuple, what: str, *, weights_apart: bool = False, **kwargs):
    """``torch.onnx.export(dynamo=True)`` of ``module`` with a symbolic batch on every input, quietly:
    ``(bytes, onnx model, weights)``: ``weights`` is None, or with ``weights_apart`` the (blob, ``GraphWeights``)
    of the initializers moved beside the graph; an ``ExportError`` naming ``what`` when it fails or fixes the
    batch."""
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    kwargs = dict(dynamo=True, dynamic_shapes=tuple({0: batch} for _ in args), external_data=weights_apart,
                  verbose=False, **kwargs)
    torch_onnx_log = logging.getLogger("torch.onnx")
    level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)  # it warns about torchvision ops we never use
    weights = None
    try:
        with tempfile.TemporaryDirectory(prefix="gradprobe-export-") as folder, warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            path = Path(folder) / "graph.onnx"
            torch.onnx.export(module, args, str(path), **kwargs)
            if weights_apart:
                model = onnx.load(str(path), load_external_data=False)
                weights = move_weights_apart(model, Path(folder))
                data = model.SerializeToString()
            else:
                data = path.read_bytes()
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed on {what}: {type(error).__name__}: "
                          f"{str(error)[:2000]}") from error
    finally:
        torch_onnx_log.setLevel(level)
    model = onnx.load_from_string(data)
    for tensor in model.graph.input:
        first = tensor.type.tensor_type.shape.dim[0]
        if not first.dim_param:
            raise ExportError(f"the exported input {tensor.name!r} of {what} has a fixed batch of "
                              f"{first.dim_value}; the batch dimension must be symbolic")
    return data, model, weights


def to_onnx(probe: ProbeModule, names: list[str], images: torch.Tensor, contrast: torch.Tensor,
            opset: int | None, weights_apart: bool = False) -> tuple[bytes, list[str], tuple | None]:
    """The ONNX graph as bytes, what would stop TensorRT from parsing it (empty when nothing), and with
    ``weights_apart`` the blob and record of its weights (else None)."""
    options = {} if opset is None else {"opset_version": opset}
    data, model, weights = onnx_bytes(OrderedOutputs(probe, names), (images, contrast), "the probe graph",
                                      input_names=["images", "contrast"], output_names=names,
                                      weights_apart=weights_apart, **options)
    problems = tensorrt_incompatibilities(model)
    if problems:
        warnings.warn(f"the probe graph will not parse in TensorRT: {problems[:3]}", stacklevel=3)
    return data, problems, weights


# -------------------------------------------------------------------------------------------- verify
def complete_with_kernels(outputs: dict, manifest: Manifest) -> dict:
    """Torch-side outputs as numpy with the tap columns completed, as the runtime engine does it."""
    from gradprobe import kernels

    arrays = {name: value.detach().numpy() for name, value in outputs.items()}
    layer_grads = manifest.classifier.layer_grads
    for tap in layer_grads.taps if layer_grads else ():
        kernels.write_tap_column(arrays["layer_grad_sqnorm"], tap.column, arrays.pop(tap.input),
                                 arrays.pop(tap.grad), tap.conv)
    return arrays


def run_exported(graph: bytes, manifest: Manifest, images: torch.Tensor, feeds: dict | None = None,
                 what: str = "the probe graph", weights: bytes | None = None) -> dict | None:
    """The exported graph (and ``weights``, the blob of ``manifest.graph_weights``) through the runtime's engine,
    as users will run it; None (with a warning) when onnxruntime is not installed, so the export is not
    verified."""
    from gradprobe.base.errors import BackendUnavailableError
    from gradprobe.runtime import build_engine

    files = {manifest.graph: graph, **({manifest.graph_weights.file: weights} if manifest.graph_weights else {})}
    try:
        engine = build_engine(dataclasses.replace(manifest, heads=()), files)
    except BackendUnavailableError:
        warnings.warn(f"onnxruntime is not installed: {what} was not verified (pip install 'gradprobe[cpu]')",
                      stacklevel=4)
        return None
    except BundleError as error:  # at export, a graph ONNX Runtime refuses is the export's failure
        raise ExportError(f"{what} was written but {error}") from error
    try:
        return engine.infer(images.numpy(), feeds)
    except GradprobeError:
        raise
    except Exception as error:  # ONNX Runtime's own failure types: a graph that loads but cannot run
        raise ExportError(f"{what} loads in ONNX Runtime but fails when run on a batch of {len(images)}: "
                          f"{type(error).__name__}: {str(error)[:600]}") from error
    finally:
        engine.close()


def verify(graph: bytes, manifest: Manifest, probe: ProbeModule, images: torch.Tensor,
           contrast: torch.Tensor, model: nn.Module | None = None, weights: bytes | None = None) -> dict:
    """Largest |ORT - torch| / max|torch| per output; ExportError when one exceeds VERIFY_TOLERANCE (NaN too).

    A sample whose network has an activation within rounding of a kink (``kinks.kink_margin``: a ReLU input
    within ``kinks.MARGIN`` of zero, or within the float32 forward's own drift there) may get the other
    one-sided derivative in ONNX Runtime, whose float32 forward rounds differently: its gradient outputs then
    differ by a finite step. Such samples are held to ``KINK_TOLERANCE`` instead
    (counted in the manifest's verification record).
    """
    got = run_exported(graph, manifest, images, {"contrast": contrast.numpy()}, weights=weights)
    if got is None:
        return {}
    with torch.no_grad():
        expected = complete_with_kernels(probe(images, contrast), manifest)
    floats = [k for k in expected if expected[k].dtype.kind == "f"]
    errors = parity_errors(got, expected, floor=1e-12, per_output=True)
    bad = {k: v for k, v in errors.items() if not v <= VERIFY_TOLERANCE and k in floats}  # NaN too
    if bad:
        per_sample = {}
        for name in bad:
            scale = max(float(np.abs(expected[name]).max(initial=0.0)), 1e-12)
            difference = np.abs(got[name].astype(np.float64) - expected[name]).reshape(len(images), -1).max(axis=1)
            per_sample[name] = difference / scale
        worst = np.max(list(per_sample.values()), axis=0)
        margins = _kink_margins(model if model is not None else probe.graph_module, probe, images)
        at_kink = margins < 1
        wrong = ~(worst <= VERIFY_TOLERANCE) & ~(at_kink & (worst <= KINK_TOLERANCE))  # NaN is wrong
        if wrong.any():
            raise ExportError(f"the exported graph disagrees with the torch model beyond {VERIFY_TOLERANCE}: {bad} "
                              f"(samples {np.nonzero(wrong)[0].tolist()}; of them at a kink: "
                              f"{np.nonzero(wrong & at_kink)[0].tolist()})")
        excused = (worst > VERIFY_TOLERANCE) & at_kink
        keep = ~excused
        errors = parity_errors({k: got[k][keep] for k in expected}, {k: expected[k][keep] for k in expected},
                               floor=1e-12, per_output=True)
        errors["samples_at_a_kink"] = float(excused.sum())
        errors["worst_at_a_kink"] = float(worst[excused].max(initial=0.0))
    return errors


def _kink_margins(model: nn.Module, probe: ProbeModule, images: torch.Tensor) -> np.ndarray:
    """``kinks.kink_margin`` of the normalised images: float64 distances against the float32 drift, on the
    model traced through every module (or the probe's own trace, where that fails: activations inside leaves
    are then unseen; or in float32 alone, where the model does not run in float64)."""
    import copy

    x = (images - probe.mean) / probe.std
    try:
        graph_module = kinks.fine_graph(model)
    except Exception:
        graph_module = probe.graph_module
    try:
        exact = copy.deepcopy(graph_module).double()
        return kinks.kink_margin(exact, x.double(), graph_module)
    except Exception:
        return kinks.kink_margin(graph_module, x)


# --------------------------------------------------------------------------------------------- write
def describe(prepared: Prepared, graph: ProbeGraph, probe: ProbeModule, outputs: dict, norms, confounding: str,
             class_names: list[str], weights: str | None) -> Manifest:
    """The typed manifest of the bundle about to be written."""
    model, example = prepared.model, prepared.example
    layer_grads = None
    if norms:
        layer_grads = LayerGrads(confounding, tuple(entry.name for entry in norms),
                                 tuple(entry.form for entry in norms),
                                 tuple(Tap(column, f"tap_input_{column}", f"tap_grad_{column}", entry.spec)
                                       for column, entry in enumerate(norms) if entry.form == "tap"))
    target_shape = tuple(outputs[probe.maps[0].name].shape[1:])
    section = ClassifierSection(
        class_names=tuple(class_names), target_layer=graph.target_name,
        target_shape=(_map_channels(graph), *target_shape), linear=graph.linear_name,
        features=int(outputs["features"].shape[1]), maps=probe.maps, layer_grads=layer_grads,
        contrastive=ContrastiveFeatures(probe.contrastive) if probe.contrastive else None)
    config = getattr(model, "config", None)
    return Manifest(
        kind="classifier",
        input=InputSpec(tuple(example.shape[1:]), (0.0, 1.0), tuple(prepared.mean), tuple(prepared.std)),
        graph=GRAPH_FILE,
        inputs=(TensorSpec("images", "float32", ("B", *example.shape[1:]), "images in [0, 1], normalised inside"),
                TensorSpec("contrast", "int64", ("B",), "class Q of the contrastive map; -1 = the runner-up")),
        outputs=tuple(probe.output_specs(outputs)), section=section,
        model=ModelInfo(type(model).__name__, int(sum(p.numel() for p in model.parameters())), weights,
                        config if isinstance(config, dict) else None),
        files={}, gradprobe_version=gradprobe.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def _map_channels(graph: ProbeGraph) -> int:
    """K of the target's map [B, K, u, v]: dim 1 of an NCHW activation, the last of NHWC and token layouts."""
    shape = graph.target.meta["tensor_meta"].shape
    return int(graph.map_of(torch.empty(tuple(shape), device="meta")).shape[1])


def _weights(model: nn.Module, prepared: Prepared, class_names) -> dict[str, bytes]:
    """Reference models (with a ``config``) ship their weights, for benchmarks and re-export."""
    config = getattr(model, "config", None)
    if not (isinstance(config, dict) and "arch" in config):
        return {}
    from .checkpoint import checkpoint_bytes

    return {WEIGHTS_FILE: checkpoint_bytes(model, normalize=[prepared.mean, prepared.std], class_names=class_names)}


def export_bundle(model: nn.Module, example_input, path: str | os.PathLike, *, target_layer: str | None = None,
                  class_names=None, normalize=None, layer_grads: bool = False, confounding: str = "bce",
                  contrastive=None, opset: int | None = None, grid: tuple | None = None,
                  hand_rules: bool = True) -> Path:
    """Export ``model`` with its probe graph as a bundle directory at ``path``; returns the path.

    ``example_input``: a few images [N, C, H, W] in [0, 1] (the shape is what the bundle accepts).
    ``target_layer``: module name whose output the maps explain (default: last convolutional stage).
    ``class_names``: one per logit (default: ``model.class_names`` or "0".."C-1").
    ``normalize``: (mean, std) applied inside the graph (default: ``model.input_normalization``).
    ``layer_grads``: also output ``layer_grad_sqnorm`` [B, P], every parameter tensor's per-sample
    gradient norm for the all-ones ``confounding`` label ("bce" on the logits, or "softmax").
    ``contrastive``: also output the contrastive features r_x (METHODS §4), ``contrastive_<variant>`` for
    "full", "compact" or "norms" (one, or a sequence of them); a second stage trained on them with
    ``gradprobe train-contrastive`` then runs in the same engine call.
    ``grid``: (h, w) of a [B, N, D] token target whose last h*w tokens lie on a patch grid (ViT-style layouts
    are found without it). ``hand_rules=False`` derives every backward with the generic rule (for measuring
    what the hand rules buy; the graph is the same function).
    Nothing is left behind on failure; an existing bundle at ``path`` is replaced whole.
    """
    prepared = prepare(model, example_input, normalize)
    variants = variants_of(contrastive)
    with _eval_mode(model):
        graph = trace(model, prepared.normalized(), target_layer, grid)
        probe, norms, outputs = build(prepared, graph, layer_grads, confounding, variants, hand_rules)
        classes = int(outputs["logits"].shape[1])
        names = [str(n) for n in (class_names if class_names is not None else
                                  getattr(model, "class_names", range(classes)))]
        if len(names) != classes:
            raise InputError(f"class_names has {len(names)} entries but the model has {classes} classes")
        weights = _weights(model, prepared, names)
        manifest = describe(prepared, graph, probe, outputs, norms, confounding, names,
                            WEIGHTS_FILE if weights else None)
        images, contrast = probe_inputs(prepared.example, classes, getattr(probe, "activation_sizes", ()))
        graph_bytes, problems, apart = to_onnx(probe, [spec.name for spec in manifest.outputs], images, contrast,
                                               opset, prepared.weights_apart)
        blob = None
        if apart is not None:
            blob, record = apart
            weights[record.file] = blob
            manifest = dataclasses.replace(manifest, graph_weights=record)
        errors = verify(graph_bytes, manifest, probe, images, contrast, model, blob)
    manifest.export.update({"torch": torch.__version__, "exporter": "torch.onnx.export(dynamo=True)",
                            "verified_against_torch": errors, "verify_tolerance": VERIFY_TOLERANCE,
                            "tensorrt_problems": problems})
    write_bundle(path, manifest, {GRAPH_FILE: graph_bytes, **weights})
    log.info("exported %s to %s (target layer %s)", type(model).__name__, path, graph.target_name)
    return Path(path)
