"""The backend contract, in the manner of Polygraphy's runners, and the registry of backends by name.

A backend runs one ONNX probe graph: it declares its input and output metadata (``TensorSpec``) and
answers ``infer(feeds) -> {name: array}``. Feeds are checked once, here, against the declared inputs;
backends implement ``_infer`` only. Backends register by name with the module that holds them, so
importing the runtime imports no inference engine; the engine loads when a backend is created.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Mapping

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, InputError
from gradprobe.base.manifest import TensorSpec

#: name -> "module:Class"; a new backend is one line here (or one ``register_backend`` call).
_REGISTRY: dict[str, str] = {
    "onnxruntime": "gradprobe.runtime.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "gradprobe.runtime.tensorrt_backend:TensorRTBackend",
}


def register_backend(name: str, target: str) -> None:
    """Make ``create_backend(name, ...)`` build ``target`` ("package.module:Class"), imported on first use."""
    _REGISTRY[name] = target


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, model: bytes, *, bundle=None, **options) -> "Backend":
    """A backend ``name`` running the serialized ONNX ``model`` (bytes already read and verified).

    ``bundle``: the opened bundle the graph came from, passed on to backends that read more of it
    (``reads_bundle``: TensorRT takes its engine from there) and ignored by the others."""
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown backend {name!r}; available: {backend_names()}")
    module_name, class_name = _REGISTRY[name].split(":")
    backend_type = getattr(importlib.import_module(module_name), class_name)
    if bundle is not None and getattr(backend_type, "reads_bundle", False):
        options["bundle"] = bundle
    return backend_type(model, **options)


def _dims_match(shape: tuple, declared: tuple) -> bool:
    return len(shape) == len(declared) and all(isinstance(d, str) or d == s for s, d in zip(shape, declared))


class Backend(ABC):
    """Runs a graph: ``infer(feeds)`` checks the feeds once and returns every output by name."""

    name: str = ""

    @property
    @abstractmethod
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def output_specs(self) -> list[TensorSpec]: ...

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.input_specs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.output_specs]

    def describe(self) -> dict:
        """What actually runs (backend name, providers or device): recorded in results and benchmarks."""
        return {"backend": self.name}

    def infer(self, feeds: Mapping[str, np.ndarray], *, check_inputs: bool = True) -> dict[str, np.ndarray]:
        if check_inputs:
            self.check_feeds(feeds)
        return self._infer(feeds)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        for spec in self.input_specs:
            if spec.name not in feeds:
                raise InputError(f"{self.name}: feed {spec.name!r} is missing; the graph takes {self.input_names}")
            value = feeds[spec.name]
            if getattr(value, "dtype", None) != np.dtype(spec.dtype) or not _dims_match(tuple(value.shape), spec.shape):
                raise InputError(f"{self.name}: feed {spec.name!r} must be {spec.dtype} of shape {list(spec.shape)}, "
                                 f"got {getattr(value, 'dtype', type(value).__name__)} of shape "
                                 f"{list(getattr(value, 'shape', ()))}")

    @abstractmethod
    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def finish(self, outputs: dict) -> dict:
        """Called by the engine once the kernels completed the norms: a backend whose ``infer`` returns
        device arrays copies them to the host here (or hands them over as they are)."""
        return outputs

    def close(self) -> None:
        """Release the engine; a closed backend cannot infer."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FixedSpecsBackend(Backend, ABC):
    """A backend that reads its specs once, when it is built, into ``_inputs`` and ``_outputs``."""

    _inputs: list[TensorSpec]
    _outputs: list[TensorSpec]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self._outputs
