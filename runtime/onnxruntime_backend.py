"""ONNX Runtime backend: explicit providers, no silent fallback, no telemetry, thread settings pinned."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, BundleError
from gradprobe.base.manifest import TensorSpec

from .backend import Backend

_EXTRA_FOR = {"CUDAExecutionProvider": "gpu", "TensorrtExecutionProvider": "gpu"}
_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


def import_onnxruntime():
    """onnxruntime with its telemetry switched off: an SDK inside vehicles and services makes no calls home."""
    try:
        import onnxruntime
    except ImportError as error:
        raise BackendUnavailableError("onnxruntime is not installed: pip install 'gradprobe[cpu]' "
                                      "(or 'gradprobe[gpu]' for onnxruntime-gpu)") from error
    if hasattr(onnxruntime, "disable_telemetry_events"):
        onnxruntime.disable_telemetry_events()
    return onnxruntime


def session_options(threads: int | None = None, spinning: bool = True):
    """Thread count pinned when given; spinning off stops sessions in one process fighting over cores."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d > 0 else str(d or "B") for d in node.shape)
    return TensorSpec(node.name, _DTYPES.get(node.type, node.type), shape)


class OnnxRuntimeBackend(Backend):
    """``providers``: ONNX Runtime provider names in order of preference (default: CPU only)."""

    name = "onnxruntime"

    def __init__(self, model: bytes, *, providers=None, threads: int | None = None, spinning: bool = True):
        ort = import_onnxruntime()
        requested = list(providers or ["CPUExecutionProvider"])
        available = ort.get_available_providers()
        missing = [p for p in requested if p not in available]
        if missing:
            extra = _EXTRA_FOR.get(missing[0], "cpu")
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {missing} are not available here (available: {available}); "
                f"install onnxruntime with them: pip install 'gradprobe[{extra}]'")
        try:
            self.session = ort.InferenceSession(model, session_options(threads, spinning), providers=requested)
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise BundleError(f"ONNX Runtime cannot load the graph: {str(error)[:500]}") from error
        self.providers = self.session.get_providers()
        if self.providers[0] != requested[0]:
            raise BackendUnavailableError(f"ONNX Runtime fell back from {requested[0]} to {self.providers[0]}; "
                                          "refusing to run on a provider that was not asked for")
        self._inputs = [_spec(node) for node in self.session.get_inputs()]
        self._outputs = [_spec(node) for node in self.session.get_outputs()]

    @property
    def input_specs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def output_specs(self) -> list[TensorSpec]:
        return self._outputs

    def describe(self) -> dict:
        return {"backend": self.name, "providers": list(self.providers)}

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        return dict(zip(names, self.session.run(names, {name: feeds[name] for name in self.input_names})))

    def close(self) -> None:
        self.session = None
