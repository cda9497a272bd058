"""Train a reference model on Fashion-MNIST (the command that produced the shipped checkpoint)."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from gradprobe.data import fashion_mnist

from .checkpoint import save_checkpoint
from .models import FASHION_MNIST_CLASSES, build_model

#: Fashion-MNIST training-set mean and standard deviation of the [0,1] pixels.
FASHION_MNIST_NORMALIZE = ((0.2860,), (0.3530,))


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on normalised ``images``."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in FASHION_MNIST_NORMALIZE)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = (torch.from_numpy(images[start:start + batch_size]) - mean) / std
            correct += (model(batch).argmax(1).numpy() == labels[start:start + batch_size]).sum()
    return float(correct) / len(images)


def train(arch: str = "resnet18-quarter", *, epochs: int = 3, batch_size: int = 128, lr: float = 0.05,
          seed: int = 0, out: str | os.PathLike = "model.safetensors", threads: int | None = None,
          limit: int | None = None, progress: bool = True) -> dict:
    """SGD (Nesterov, OneCycle) with random horizontal flips; saves a safetensors checkpoint.

    Returns ``{"path", "test_accuracy", "epochs", "seed", "arch"}``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if threads:
        torch.set_num_threads(threads)
    images, labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    if limit:
        images, labels = images[:limit], labels[:limit]
    model = build_model(arch)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in FASHION_MNIST_NORMALIZE)
    steps = epochs * (len(images) // batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    bar = tqdm(total=steps, desc=f"train {arch}", disable=not progress, unit="step")
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            batch = torch.from_numpy(images[index])
            flip = torch.from_numpy(rng.random(len(index)) < 0.5)
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = loss_fn(model((batch - mean) / std), torch.from_numpy(labels[index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    accuracy = evaluate(model, test_images, test_labels)
    command = f"gradprobe train --arch {arch} --epochs {epochs} --seed {seed} --out {os.fspath(out)}"
    save_checkpoint(model.eval(), out, normalize=[list(v) for v in FASHION_MNIST_NORMALIZE],
                    class_names=list(FASHION_MNIST_CLASSES), test_accuracy=accuracy,
                    trained_with=command, torch_version=torch.__version__)
    return {"path": os.fspath(out), "test_accuracy": accuracy, "epochs": epochs, "seed": seed, "arch": arch}
