"""Shared fixtures: real Fashion-MNIST, reference models with non-trivial BatchNorm, exported bundles."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradprobe  # noqa: E402
from gradprobe.models import FASHION_MNIST_CLASSES, build_model, load_pretrained  # noqa: E402

#: The reference models of the parity suite: every architecture and head variant.
REFERENCE_MODELS = ("resnet18-quarter", "vgg", "vgg-bn", "mobilenet", "pretrained")


def make_model(name: str, seed: int = 0):
    """A reference model in eval mode; random ones get random BatchNorm statistics so BN is not the identity."""
    if name == "pretrained":
        return load_pretrained("resnet-fmnist")
    torch.manual_seed(seed)
    model = build_model(name)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            channels = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
            module.weight.data.copy_(1 + 0.2 * torch.randn(channels, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(channels, generator=generator))
    model.class_names = list(FASHION_MNIST_CLASSES)
    return model.eval()


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
