"""ONNX Runtime backend with explicit providers and no silent fallback to another provider."""
from __future__ import annotations

import os

import numpy as np

from gradprobe.errors import BackendUnavailableError, BundleError

_EXTRA_FOR = {"CUDAExecutionProvider": "gpu", "TensorrtExecutionProvider": "gpu"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'gradprobe[cpu]' "
                                      "(or 'gradprobe[gpu]' for onnxruntime-gpu)") from error
    return onnxruntime


def session_options(threads: int | None = None, spinning: bool = True):
    """Thread count pinned when given; spinning off stops sessions in one process fighting over cores."""
    ort = _import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OrtBackend:
    """``providers``: ONNX Runtime provider names in order of preference (default: CPU only)."""

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, providers=None, *, threads: int | None = None,
                 spinning: bool = True):
        ort = _import_onnxruntime()
        requested = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in requested if p not in available]
        if missing:
            extra = _EXTRA_FOR.get(missing[0], "cpu")
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {missing} are not available here (available: {available}); "
                f"install onnxruntime with them: pip install 'gradprobe[{extra}]'")
        try:
            self.session = ort.InferenceSession(str(model_path), session_options(threads, spinning),
                                                providers=requested)
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise BundleError(f"ONNX Runtime cannot load {model_path}: {str(error)[:500]}") from error
        self.providers = self.session.get_providers()
        if self.providers[0] != requested[0]:
            raise BackendUnavailableError(f"ONNX Runtime fell back from {requested[0]} to {self.providers[0]}; "
                                          "refusing to run on a provider that was not asked for")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], output_names=None) -> dict[str, np.ndarray]:
        names = list(output_names or self.output_names)
        values = self.session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, values))
