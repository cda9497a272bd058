"""Shared fixtures: real Fashion-MNIST, reference models with non-trivial BatchNorm, exported bundles."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradprobe  # noqa: E402
from gradprobe.models import FASHION_MNIST_CLASSES, build_model, load_pretrained  # noqa: E402

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
    """A reference model in eval mode, briefly trained (cached per session); "pretrained" is the shipped one."""
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


@pytest.fixture(scope="session")
def fmnist_test():
    """The real Fashion-MNIST test split (Debian package dataset-fashion-mnist)."""
    return gradprobe.data.fashion_mnist("test")


@pytest.fixture(scope="session")
def exported(tmp_path_factory, fmnist_test):
    """exported(name) -> (model, bundle path), each model exported once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_model(name)
            path = tmp_path_factory.mktemp("bundles") / name
            gradprobe.export(model, fmnist_test[0][:4], path)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
