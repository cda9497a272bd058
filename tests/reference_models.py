"""Reference models with real BatchNorm statistics for the parity suites (needs torch)."""
from __future__ import annotations

import numpy as np
import torch

import gradprobe
from gradprobe.models import FASHION_MNIST_CLASSES, build_model, load_pretrained

#: The reference models of the parity suite: every architecture and head variant.
REFERENCE_MODELS = ("resnet18-quarter", "vgg", "vgg-bn", "mobilenet", "pretrained")


def _briefly_train(model, steps: int, seed: int):
    """A few SGD steps on real Fashion-MNIST: logits spread out and BatchNorm gets real statistics,
    so the maps and gradients under test are those of a model that has learnt something."""
    from gradprobe.export.train import FASHION_MNIST_NORMALIZE

    images, labels = gradprobe.data.fashion_mnist("train")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in FASHION_MNIST_NORMALIZE)
    order = np.random.default_rng(seed).permutation(len(images))[: steps * 64]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        index = order[step * 64:(step + 1) * 64]
        loss = torch.nn.functional.cross_entropy(model((torch.from_numpy(images[index]) - mean) / std),
                                                 torch.from_numpy(labels[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.input_normalization = FASHION_MNIST_NORMALIZE
    return model.eval()


_MODELS = {}


def make_model(name: str, seed: int = 0, steps: int = 40):
    """A reference model in eval mode, briefly trained (cached per process); "pretrained" is the shipped one."""
    if name == "pretrained":
        return load_pretrained("resnet-fmnist")
    key = (name, seed, steps)
    if key not in _MODELS:
        torch.manual_seed(seed)
        model = build_model(name)
        _briefly_train(model, steps, seed)
        model.class_names = list(FASHION_MNIST_CLASSES)
        _MODELS[key] = model
    return _MODELS[key]
