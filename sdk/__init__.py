"""gradprobe: gradient-based reliability for deployed image classifiers.

``import gradprobe`` pulls in numpy only. The export layer (torch) and the runtime backends load
when first used: ``gradprobe.export(model, example, path)`` and ``gradprobe.load(bundle)``.
"""
from __future__ import annotations

import importlib

from .base.errors import (BackendUnavailableError, BundleError, DataError, ExportError, GradprobeError,
                          InputError, NotFittedError)

__version__ = "0.2.0"

_LAZY_MODULES = {"export", "models", "data", "runtime", "kernels", "viz", "cli", "detect", "explain", "base",
                 "contrastive", "gradcon"}
_LAZY_ATTRIBUTES = {"load": ("probe", "load"), "Probe": ("probe", "Probe"),
                    "ProbeResult": ("results", "ProbeResult"), "Explanation": ("explain", "Explanation"),
                    "DetectionResult": ("detect", "DetectionResult"),
                    "ContrastiveResult": ("contrastive", "ContrastiveResult")}

__all__ = ["export", "load", "Probe", "ProbeResult", "Explanation", "DetectionResult", "ContrastiveResult",
           "GradprobeError", "ExportError", "BackendUnavailableError", "InputError", "NotFittedError", "BundleError", "DataError"]


def __getattr__(name: str):
    # Lazy so that `import gradprobe` never imports torch or onnxruntime.
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_ATTRIBUTES:
        module, attribute = _LAZY_ATTRIBUTES[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    raise AttributeError(f"module 'gradprobe' has no attribute {name!r}")
