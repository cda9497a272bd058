"""The backend contract and the factory that picks one."""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs a probe graph: ``run({"images": ..., "contrast": ...}) -> {output name: array}``."""

    name: str
    providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def make_backend(model_path: str | os.PathLike, providers=None, **options) -> Backend:
    """Today every provider list goes to ONNX Runtime; TensorRT engines plug in here."""
    from .ort import OrtBackend

    return OrtBackend(model_path, providers=providers, **options)
