"""Export fixtures: every reference model exported once per session."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradprobe  # noqa: E402

from ..reference_models import make_model  # noqa: E402


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
