"""GradCon (Kwon et al., ECCV 2020; METHODS.md §2): the autoencoder, its gradient-constrained objective and
training, with the running-mean reference gradients stored in the model so one safetensors file holds both.

Objective per batch: J = L + α·L_grad, L = pixel MSE, L_grad = −(1/4) Σ_i cos(∂L/∂φ_i, ĝ_i) over the four
decoder weights φ_i (second order: the constraint is differentiated). ĝ_i is the running mean of every past
per-iteration gradient of J (never reset); the first iteration has no reference and uses L alone — all as in
the authors' code (olivesgatech/gradcon-anomaly, ae_grad_reg.train).
"""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gradprobe.base.errors import BundleError, InputError

from .checkpoint import read_metadata, save_checkpoint

ALPHA = 0.03          # weight of the gradient constraint in training (authors' --grad-loss-weight)
BETA = 0.12           # weight of the mean cosine in the test score (authors' eval --grad-loss-weight)
COSINE_EPS = 1e-8     # torch.nn.functional.cosine_similarity's default, so scores match the authors'
ARCH = "gradcon-cae"


class GradConCAE(nn.Module):
    """The authors' GradConCAE: 4×4 stride-2 convs, no BatchNorm, 28×28 → 64×3×3 → 28×28.

    Layout (``down``/``up`` Sequentials) kept from the authors' code so their state dicts map one to one.
    The reference gradients ĝ_i live in buffers ``reference_0..3`` (and ``reference_count``), so they travel
    with the weights; they are not parameters (230,721 parameters for one channel).
    """

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.config = dict(arch=ARCH, in_channels=in_channels)
        self.down = nn.Sequential(
            nn.Conv2d(in_channels, 32, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 32, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(64, 64, 4, stride=2, padding=2), nn.ReLU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=2), nn.ReLU(),        # 3 -> 4
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),        # 4 -> 8
            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=2), nn.ReLU(),        # 8 -> 14
            nn.ConvTranspose2d(32, in_channels, 4, stride=2, padding=1), nn.Sigmoid())  # 14 -> 28
        for index, layer in enumerate(self.decoder_layers()):
            self.register_buffer(f"reference_{index}", torch.zeros_like(layer.weight))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def decoder_layers(self) -> list[nn.ConvTranspose2d]:
        return [self.up[i] for i in range(0, len(self.up), 2)]

    def decoder_weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.decoder_layers()]

    def decoder_weight_names(self) -> tuple[str, ...]:
        return tuple(f"up.{i}.weight" for i in range(0, len(self.up), 2))

    def references(self) -> list[torch.Tensor]:
        """ĝ_i, the running means of past training gradients of J (zeros before the first update)."""
        return [getattr(self, f"reference_{i}") for i in range(len(self.decoder_layers()))]

    @torch.no_grad()
    def update_references(self, grads) -> None:
        """Fold one iteration's gradients into the running means (the authors' AverageMeter.update(g, 1))."""
        self.reference_count += 1
        count = float(self.reference_count)
        for reference, grad in zip(self.references(), grads):
            reference += (grad - reference) / count


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flat_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of two whole tensors, exactly the authors' ``cosine_similarity(a.view(-1,1), b.view(-1,1), 0)``."""
    return F.cosine_similarity(a.reshape(-1, 1), b.reshape(-1, 1), dim=0, eps=COSINE_EPS)[0]


def gradcon_objective(model: GradConCAE, images: torch.Tensor, alpha: float = ALPHA, create_graph: bool = True):
    """(J, L, L_grad) for one batch; with ``create_graph`` J is differentiable through the constraint."""
    recon_loss = F.mse_loss(model(images), images)
    if int(model.reference_count) == 0:  # no history yet: the constraint is not used
        return recon_loss, recon_loss, recon_loss.new_zeros(())
    grads = torch.autograd.grad(recon_loss, model.decoder_weights(), create_graph=create_graph)
    grad_loss = -torch.stack([flat_cosine(g, ref) for g, ref in zip(grads, model.references())]).mean()
    return recon_loss + alpha * grad_loss, recon_loss, grad_loss


def training_step(model: GradConCAE, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  alpha: float = ALPHA) -> tuple[float, float]:
    """One Adam step on J; the reference takes this iteration's gradient of J before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss, recon_loss, grad_loss = gradcon_objective(model, images, alpha)
    loss.backward()
    model.update_references([w.grad for w in model.decoder_weights()])
    optimizer.step()
    return float(recon_loss.detach()), float(grad_loss.detach())


def validation_loss(model: GradConCAE, images: np.ndarray, alpha: float = ALPHA, batch_size: int = 64) -> float:
    """Mean J over batches of inlier validation images (the authors' checkpoint criterion)."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size])
        loss = gradcon_objective(model, batch, alpha, create_graph=False)[0]
        total += float(loss.detach()) * len(batch)
    return total / len(images)


def _check_images(images, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[2:] != (28, 28) or images.dtype != np.float32:
        raise InputError(f"{what} must be float32 images [N, C, 28, 28] in [0, 1], got "
                         f"{images.dtype} {list(images.shape)}")
    if len(images) == 0:
        raise InputError(f"{what} is empty")
    return images


def train_gradcon(train_images, val_images=None, *, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                  alpha: float = ALPHA, seed: int = 0, max_steps: int | None = None, threads: int | None = None,
                  progress: bool = True, desc: str = "train gradcon", snapshots=None) -> tuple[GradConCAE, dict]:
    """Adam on J over shuffled batches (the last partial batch kept, as a DataLoader does).

    With ``val_images`` the model (weights and references together) is kept from the epoch of lowest
    validation J, checked after every epoch; the authors checked every fifth, which over 1000 epochs
    matters little and over a few dozen would skip most candidates. Returns (model in eval mode, record).
    ``snapshots``: {epoch: callback(model, record)}, called with what a run of that many epochs would
    return (the same seed gives the same first epochs), so one long run also yields the shorter ones.
    """
    train_images = _check_images(train_images, "train_images")
    if val_images is not None:
        val_images = _check_images(val_images, "val_images")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GradConCAE(train_images.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = -(-len(train_images) // batch_size)
    total = min(epochs * per_epoch, max_steps) if max_steps else epochs * per_epoch
    best = (float("inf"), None, 0)
    history, step, started = [], 0, (time.perf_counter(), time.process_time())
    settings = {"alpha": alpha, "lr": lr, "batch_size": batch_size, "seed": seed, "train_images": len(train_images)}
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step")
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(train_images))
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            recon, grad = training_step(model, optimizer, torch.from_numpy(train_images[order[start:start + batch_size]]),
                                        alpha)
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, recon=f"{recon:.4f}", grad=f"{grad:.3f}")
        entry = {"epoch": epoch, "steps": step, "recon_loss": recon, "grad_loss": grad}
        if val_images is not None:
            model.eval()
            entry["val_loss"] = validation_loss(model, val_images, alpha)
            if entry["val_loss"] < best[0]:
                best = (entry["val_loss"], copy.deepcopy(model.state_dict()), epoch)
        history.append(entry)
        if snapshots and epoch in snapshots and epoch < epochs and step < total:
            snapshots[epoch](*_result(model, best, history, step, started, settings))
        if step >= total:
            break
    bar.close()
    return _result(model, best, history, step, started, settings)


def _result(model: GradConCAE, best: tuple, history: list, step: int, started: float, settings: dict):
    """(model selected by validation, training record) as train_gradcon returns them."""
    if best[1] is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(best[1])
    record = {"epochs": history[-1]["epoch"], "steps": step, "best_epoch": best[2] or history[-1]["epoch"],
              "best_val_loss": best[0] if best[1] is not None else None,
              "seconds": time.perf_counter() - started[0], "cpu_seconds": time.process_time() - started[1],
              **settings, "history": list(history)}
    return model.eval(), record


def save_gradcon(model: GradConCAE, path: str | os.PathLike, **metadata):
    """Weights and references in one safetensors file (atomic); ``metadata`` stored as JSON."""
    return save_checkpoint(model, path, **metadata)


def load_gradcon(source: str | os.PathLike | bytes) -> tuple[GradConCAE, dict]:
    """(model in eval mode, metadata) from a file written by :func:`save_gradcon`, or its bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    where = "checkpoint" if isinstance(source, bytes) else str(source)
    metadata = read_metadata(data)
    config = metadata.get("config") or {}
    if config.get("arch") != ARCH:
        raise BundleError(f"{where} is not a GradCon checkpoint (config {config}); train one with "
                          "`gradprobe train-gradcon --normal-class K`")
    model = GradConCAE(config.get("in_channels", 1))
    try:
        model.load_state_dict(load(data))
    except (SafetensorError, RuntimeError) as error:
        raise BundleError(f"{where}: weights do not fit a GradConCAE: {str(error)[:300]}") from error
    if int(model.reference_count) == 0:
        raise BundleError(f"{where} holds no reference gradients (the model was never trained)")
    return model.eval(), metadata


#: ``--quick``: a few hundred training images and a few dozen steps, to keep CI and smoke runs short.
QUICK = dict(epochs=1, max_steps=40, train_limit=2560, val_limit=256)


def train_normal_class(normal_class: int, out: str | os.PathLike, *, epochs: int = 20, seed: int = 0,
                       quick: bool = False, threads: int | None = None, progress: bool = True,
                       split_seed: int = 0, snapshots: dict | None = None) -> dict:
    """Train one Fashion-MNIST model under the GPND protocol (normal class, folds 0-2; validation fold 3)
    and save it; returns the training record (what ``gradprobe train-gradcon`` prints).
    ``snapshots``: {epoch: path} also saves what ``epochs=epoch`` would have produced."""
    from gradprobe.data import fashion_mnist_pooled, gpnd_folds, gpnd_split

    images, labels = fashion_mnist_pooled()
    split = gpnd_split(labels, gpnd_folds(labels, split_seed), normal_class, 50)
    train_images = images[split["train"]]
    val_images = images[split["val"][~split["val_outlier"]]]
    max_steps = None
    if quick:
        epochs, max_steps = QUICK["epochs"], QUICK["max_steps"]
        train_images, val_images = train_images[:QUICK["train_limit"]], val_images[:QUICK["val_limit"]]

    def save(path):
        def write(model, record):
            command = (f"gradprobe train-gradcon --normal-class {normal_class} "
                       f"{'--quick' if quick else '--epochs ' + str(record['epochs'])} --seed {seed} "
                       f"--out {os.fspath(path)}")
            record.update(normal_class=normal_class, split_seed=split_seed, quick=quick)
            save_gradcon(model, path, normal_class=normal_class, split_seed=split_seed, trained_with=command,
                         protocol="GPND Fashion-MNIST: folds 0-2 train, fold 3 validation",
                         torch_version=torch.__version__, training={k: v for k, v in record.items() if k != "history"})
            return record
        return write

    callbacks = {epoch: save(path) for epoch, path in (snapshots or {}).items()}
    model, record = train_gradcon(train_images, val_images, epochs=epochs, seed=seed, max_steps=max_steps,
                                  threads=threads, progress=progress, desc=f"gradcon class {normal_class}",
                                  snapshots=callbacks)
    return save(out)(model, record)
