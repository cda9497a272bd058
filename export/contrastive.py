"""Contrastive inference (METHODS.md §4): the features r_x in closed form, the second-stage MLP and its head graph.

For the prediction P and every class i, J(P, i) = CE(z, i) and ``dJ/dW = (p - e_i) h^T`` (W the last
Linear's weight). The variants the probe graph can emit (``gradprobe.export(..., contrastive=...)``):

- ``full``    [C, C, d]: (p - e_i) h^T for every i;
- ``compact`` [C, d]:    row i of it only, (p_i - 1) h;
- ``norms``   [C]:       ||(p - e_i) h^T||_F = ||p - e_i|| ||h||.

All are fixed functions of (p, h): one forward, no backward. The second stage is a 3-layer MLP trained on
r_x of clean training images; it ships as a second small ONNX graph (a *head*) that the runtime engine runs
right after the probe graph, so one engine call returns ``contrastive_logits`` beside the logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradprobe.base.errors import ExportError, InputError
from gradprobe.base.manifest import CONTRASTIVE_SHAPES, ContrastiveFeatures, HeadSpec, TensorSpec

from .reductions import squared_sum

VARIANTS = tuple(CONTRASTIVE_SHAPES)
MEANINGS = {
    "full": "r_x, METHODS §4 full: dCE(z,i)/dW = (p - e_i) h^T for every class i, [B, C, C, d]",
    "compact": "r_x, METHODS §4 compact: row i of dCE(z,i)/dW, (p_i - 1) h, for every class i, [B, C, d]",
    "norms": "||dCE(z,i)/dW||_F = ||p - e_i|| ||h|| for every class i, [B, C]",
}
HEAD_NAME = "contrastive"
HEAD_OUTPUTS = ("contrastive_logits", "contrastive_probs", "contrastive_pred")
#: Largest |ORT - torch| of the head graph accepted at export, relative to the largest logit.
HEAD_TOLERANCE = 1e-4


def variants_of(contrastive) -> tuple:
    """``contrastive`` as given to export (None, a variant, or several) -> a tuple of distinct variants."""
    if contrastive is None:
        return ()
    chosen = (contrastive,) if isinstance(contrastive, str) else tuple(contrastive)
    bad = [v for v in chosen if v not in VARIANTS]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise InputError(f"contrastive must be None, one of {list(VARIANTS)}, or several distinct of them; "
                         f"got {contrastive!r}")
    return chosen


def delta_sqnorms(probs: torch.Tensor) -> torch.Tensor:
    """||p - e_i||^2 for every class i, [B, C]; at i = P the sum of the other p_j^2 is taken directly, so a
    confident prediction (p_P near 1) does not lose its small value to cancellation."""
    squares = probs * probs
    total = squares.sum(dim=1, keepdim=True)
    is_pred = torch.arange(probs.shape[1], device=probs.device)[None, :] == probs.argmax(dim=1, keepdim=True)
    others_of_pred = torch.where(is_pred, torch.zeros_like(squares), squares).sum(dim=1, keepdim=True)
    others = torch.where(is_pred, others_of_pred, total - squares)
    return others + (1 - probs) ** 2


def contrastive_features(variant: str, probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """r_x of one variant from p [B, C] and h [B, d], in closed form (the graph and the training both use this)."""
    if variant == "compact":
        return (probs - 1)[:, :, None] * features[:, None, :]
    if variant == "full":
        eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
        return (probs[:, None, :] - eye[None])[..., None] * features[:, None, None, :]
    if variant == "norms":
        return torch.sqrt(delta_sqnorms(probs) * squared_sum(features, start_dim=1).unsqueeze(1))
    raise InputError(f"unknown contrastive variant {variant!r}; expected one of {list(VARIANTS)}")


def reference_features(reference, images: np.ndarray, variant: str) -> np.ndarray:
    """r_x by autograd, research-style: per image, one full ``backward`` of CE(z, i) per class i, reading the
    last Linear's weight gradient (``reference``: a ``gradprobe.export.reference.ResearchReference``)."""
    return reduce_gradients(reference.last_layer_gradients(images), variant)


def reduce_gradients(grads: np.ndarray, variant: str) -> np.ndarray:
    """A variant of r_x from the autograd gradients [N, C, C, d] (class i, row j, column k) of every class."""
    grads = np.asarray(grads, dtype=np.float64)
    if variant == "full":
        return grads
    if variant == "compact":
        classes = grads.shape[1]
        return grads[:, np.arange(classes), np.arange(classes)]
    if variant == "norms":
        return np.sqrt((grads ** 2).sum(axis=(2, 3)))
    raise InputError(f"unknown contrastive variant {variant!r}; expected one of {list(VARIANTS)}")


# ------------------------------------------------------------------------------------------ the MLP
class ContrastiveMLP(nn.Module):
    """Standardise, flatten, then Linear-ReLU-Linear-ReLU-Linear: the 3-layer second stage (METHODS §4).

    The standardisation (training-set mean and std per input value) is part of the module, so the head
    graph takes r_x exactly as the probe graph emits it.
    """

    def __init__(self, inputs: int, classes: int, hidden=(256, 128)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("scale", torch.ones(inputs))
        widths = [inputs, *hidden]
        layers = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(widths[-1], classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x.flatten(1) - self.mean) * self.scale)


@dataclass
class FitReport:
    """How one MLP was fitted: what a head's manifest ``fit`` records."""

    seed: int
    epochs: int
    best_epoch: int
    held_out: int
    held_out_accuracy: float
    train_images: int
    curve: list = field(default_factory=list)  # held-out accuracy after each epoch

    def to_json(self) -> dict:
        return {"seed": self.seed, "epochs_run": self.epochs, "best_epoch": self.best_epoch,
                "fit_images": self.train_images, "held_out_images": self.held_out,
                "held_out_accuracy": round(self.held_out_accuracy, 6),
                "held_out_curve": [round(v, 6) for v in self.curve]}


def _batches(make_input, index: np.ndarray, size: int):
    for start in range(0, len(index), size):
        part = index[start:start + size]
        yield part, make_input(part)


def _standardize(mlp: ContrastiveMLP, make_input, index: np.ndarray) -> None:
    """Mean and 1/std of every input value over ``index`` (a zero std scales by 1: the value is constant)."""
    total = total_sq = None
    for _, x in _batches(make_input, index, 2048):
        x = x.flatten(1).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq = (x * x).sum(0) if total_sq is None else total_sq + (x * x).sum(0)
    mean = total / len(index)
    std = torch.sqrt(torch.clamp(total_sq / len(index) - mean * mean, min=0))
    mlp.mean.copy_(mean.float())
    mlp.scale.copy_(torch.where(std > 1e-6 * std.max().clamp(min=1e-30), 1 / std, torch.ones_like(std)).float())


def predict_mlp(mlp: nn.Module, make_input, count: int, batch_size: int = 2048) -> np.ndarray:
    """Logits [N, C] of ``mlp`` on ``make_input(index)`` for every index in 0..count-1."""
    mlp.eval()
    out = []
    with torch.no_grad():
        for _, x in _batches(make_input, np.arange(count), batch_size):
            out.append(mlp(x).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def fit_mlp(make_input, labels: np.ndarray, classes: int, *, seed: int = 0, hidden=(256, 128),
            max_epochs: int = 30, patience: int = 4, held_out: float = 0.1, batch_size: int = 256,
            lr: float = 1e-3, weight_decay: float = 1e-4, max_steps: int | None = None,
            progress: bool = True, desc: str = "contrastive MLP") -> tuple[ContrastiveMLP, FitReport]:
    """Train a ``ContrastiveMLP`` on ``make_input(index) -> [n, ...]`` with ``labels``; Adam, cross-entropy.

    A seeded ``held_out`` fraction is kept out of training; training stops when its accuracy has not
    improved for ``patience`` epochs, and the weights of the best epoch are returned. ``max_steps``
    caps the optimizer steps (quick checks). One torch thread: the machine is shared.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not 0 < held_out < 1:
        raise InputError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(round(len(labels) * held_out))
    held, fit = order[:cut], order[cut:]
    if len(held) == 0 or len(fit) == 0:
        raise InputError(f"{len(labels)} labelled images are too few to keep {held_out:.0%} held out")
    from tqdm.auto import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        sample = make_input(fit[:1])
        mlp = ContrastiveMLP(int(np.prod(sample.shape[1:])), classes, hidden)
        _standardize(mlp, make_input, fit)
        optimizer = torch.optim.Adam(mlp.parameters(), lr=lr, weight_decay=weight_decay)
        rng = np.random.default_rng(seed + 1)
        best, best_state, best_epoch, curve, steps = -1.0, None, 0, [], 0
        per_epoch = -(-len(fit) // batch_size)
        total = min(max_epochs * per_epoch, max_steps or max_epochs * per_epoch)
        bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
        for epoch in range(1, max_epochs + 1):
            mlp.train()
            for part, x in _batches(make_input, fit[rng.permutation(len(fit))], batch_size):
                loss = nn.functional.cross_entropy(mlp(x), torch.from_numpy(labels[part]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                bar.update(1)
                if max_steps and steps >= max_steps:
                    break
            accuracy = float((predict_mlp(mlp, lambda i: make_input(held[i]), len(held)).argmax(1)
                              == labels[held]).mean())
            curve.append(accuracy)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", held_out=f"{accuracy:.4f}")
            if accuracy > best:
                best, best_epoch = accuracy, epoch
                best_state = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
            if epoch - best_epoch >= patience or (max_steps and steps >= max_steps):
                break
        bar.close()
    finally:
        torch.set_num_threads(threads)
    mlp.load_state_dict(best_state)
    return mlp.eval(), FitReport(seed, len(curve), best_epoch, len(held), best, len(fit), curve)


# ------------------------------------------------------------------------------------- the head graph
class HeadModule(nn.Module):
    """The MLP as the head graph: r_x -> (contrastive_logits, contrastive_probs, contrastive_pred)."""

    def __init__(self, mlp: ContrastiveMLP):
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor):
        logits = self.mlp(x)
        return logits, torch.softmax(logits, dim=1), logits.argmax(dim=1)


def head_graph(mlp: ContrastiveMLP, input_spec: TensorSpec, classes: int) -> tuple[bytes, HeadSpec]:
    """The head graph as ONNX bytes (symbolic batch, checked against the torch MLP with ONNX Runtime) and its
    manifest entry; the file name carries the graph's sha256 so a retrained head never overwrites the old one."""
    from gradprobe.base.bundle import sha256_hex

    from .pipeline import onnx_bytes  # the pipeline imports this module

    head = HeadModule(mlp.eval())
    example = torch.randn(5, *input_spec.shape[1:], generator=torch.Generator().manual_seed(0))
    data, _, _ = onnx_bytes(head, (example,), "the contrastive head", input_names=[input_spec.name],
                         output_names=list(HEAD_OUTPUTS))
    _verify_head(data, head, example, input_spec.name)
    outputs = (TensorSpec("contrastive_logits", "float32", ("B", classes), "second-stage MLP logits on r_x, [B, C]"),
               TensorSpec("contrastive_probs", "float32", ("B", classes), "softmax of contrastive_logits, [B, C]"),
               TensorSpec("contrastive_pred", "int64", ("B",), "contrastive prediction, argmax, [B] int64"))
    spec = HeadSpec(HEAD_NAME, f"head-{HEAD_NAME}-{sha256_hex(data)[:16]}.onnx", (input_spec,), outputs)
    return data, spec


def _verify_head(data: bytes, head: HeadModule, example: torch.Tensor, input_name: str) -> None:
    from gradprobe.runtime import create_backend

    backend = create_backend("onnxruntime", data)
    try:
        got = backend.infer({input_name: example.numpy()})
    finally:
        backend.close()
    with torch.no_grad():
        logits, probs, pred = (t.numpy() for t in head(example))
    error = float(np.abs(got["contrastive_logits"] - logits).max() / max(np.abs(logits).max(), 1e-12))
    if error > HEAD_TOLERANCE or not (got["contrastive_pred"] == pred).all():
        raise ExportError(f"the exported contrastive head disagrees with the torch MLP ({error:.2e} > "
                          f"{HEAD_TOLERANCE})")


# ------------------------------------------------------------------------------------ training a head
def engine_outputs(probe, images: np.ndarray, names=("probs", "features"), chunk: int = 1024,
                   progress: bool = True, desc: str = "probe graph") -> dict[str, np.ndarray]:
    """Selected outputs of the bundle's engine for many images, in chunks (the rest is dropped as it comes)."""
    from tqdm.auto import tqdm

    kept = {name: [] for name in names}
    for start in tqdm(range(0, len(images), chunk), desc=desc, unit="chunk", disable=not progress, leave=False):
        result = probe.run(images[start:start + chunk])
        for name in names:
            kept[name].append(result[name])
    return {name: np.concatenate(parts) for name, parts in kept.items()}


def rx_input(variant: str, probs: np.ndarray, features: np.ndarray):
    """``make_input(index)`` for ``fit_mlp``: r_x of those rows, computed as the graph computes it."""
    probs_t, features_t = torch.from_numpy(probs), torch.from_numpy(features)
    return lambda index: contrastive_features(variant, probs_t[index], features_t[index])


def ph_input(probs: np.ndarray, features: np.ndarray):
    """``make_input(index)`` of the honest control: (p, h) side by side, the inputs r_x is a fixed function of."""
    both = torch.from_numpy(np.concatenate([probs, features], axis=1))
    return lambda index: both[index]


def train_head(probe, images, labels, *, variant: str | None = None, seed: int = 0, hidden=(256, 128),
               max_epochs: int = 30, patience: int = 4, held_out: float = 0.1, max_steps: int | None = None,
               progress: bool = True, description: str = "") -> tuple[HeadSpec, bytes, ContrastiveMLP]:
    """Fit the second stage of ``probe``'s bundle on labelled clean images; returns its head spec, graph bytes and
    the torch MLP. The bundle must emit r_x (exported with ``contrastive=...``); the model itself is not needed."""
    variant = _variant(probe, variant)
    images, labels = _labelled(probe, images, labels)
    outputs = engine_outputs(probe, images, ("probs", "features"), progress=progress)
    make_input = rx_input(variant, outputs["probs"], outputs["features"])
    _check_closed_form(probe, images[:64], make_input, ContrastiveFeatures.output_name(variant))
    classes = len(probe.manifest.classifier.class_names)
    mlp, report = fit_mlp(make_input, labels, classes, seed=seed, hidden=hidden, max_epochs=max_epochs,
                          patience=patience, held_out=held_out, max_steps=max_steps, progress=progress,
                          desc=f"contrastive MLP ({variant}, seed {seed})")
    fit = {"variant": variant, "hidden": list(hidden), "optimizer": "Adam",
           "data": description or f"{len(images)} labelled images", **report.to_json()}
    return (*make_head(probe, mlp, variant, fit), mlp)


def make_head(probe, mlp: ContrastiveMLP, variant: str, fit: dict) -> tuple[HeadSpec, bytes]:
    """The head spec and graph of a fitted MLP reading ``probe``'s r_x of ``variant`` (``fit``: what to record)."""
    variant = _variant(probe, variant)
    data, spec = head_graph(mlp, probe.manifest.output(ContrastiveFeatures.output_name(variant)),
                            len(probe.manifest.classifier.class_names))
    return HeadSpec(spec.name, spec.file, spec.inputs, spec.outputs, {"variant": variant, **fit}), data


def _variant(probe, variant: str | None) -> str:
    section = probe.manifest.classifier
    offered = section.contrastive.variants if section.contrastive else ()
    if not offered:
        raise InputError(f"bundle {probe.path} emits no contrastive features: re-export it with "
                         "gradprobe.export(model, example, path, contrastive='compact') (or 'full', 'norms')")
    if variant is not None and variant not in offered:
        raise InputError(f"bundle {probe.path} emits contrastive variants {list(offered)}, not {variant!r}")
    return variant or offered[0]


def _labelled(probe, images, labels) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise InputError(f"labels must be integers [N] for the {len(images)} images, got {labels.dtype} "
                         f"{list(labels.shape)}")
    classes = len(probe.manifest.classifier.class_names)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"labels must lie in [0, {classes - 1}]")
    return images, labels


def _check_closed_form(probe, images: np.ndarray, make_input, name: str) -> None:
    """The MLP trains on r_x computed from the engine's (p, h); it must equal the graph's own r_x output."""
    if not len(images):
        return
    graph = probe.run(images)[name]
    ours = make_input(np.arange(len(images))).numpy()
    scale = max(float(np.abs(graph).max()), 1e-12)
    if float(np.abs(graph - ours).max()) > 1e-4 * scale:
        raise ExportError(f"{name} from the graph differs from its closed form on the graph's (p, h); the bundle "
                          "was exported by another version of gradprobe: re-export it")
