"""ONNX Runtime backend: explicit providers, no silent fallback, no telemetry, thread settings pinned."""
from __future__ import annotations

import tempfile
from typing import Mapping

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, BundleError
from gradprobe.base.manifest import TensorSpec

from .backend import FixedSpecsBackend

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


_SHORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _provider_name(provider) -> str:
    name = provider[0] if isinstance(provider, (tuple, list)) else provider
    return _SHORT_NAMES.get(str(name).lower(), name)


class OnnxRuntimeBackend(FixedSpecsBackend):
    """``providers``: ONNX Runtime providers in order of preference, names ("CUDAExecutionProvider", or
    "cuda" / "cpu") or (name, options) pairs such as ("cuda", {"device_id": 1}); default: CPU only.

    The first provider is the one asked for: a session that comes up on another (ONNX Runtime falls back
    to CPU when, say, the CUDA libraries fail to load) is refused. ``strict``: also refuse a session in
    which some nodes would run on the CPU beside the GPU provider (ONNX Runtime places shape computations
    there on purpose, so this is opt-in). ``initializers``: name -> array for the graph's initializers that it
    keeps outside (a model over 2 GiB): handed to ONNX Runtime from memory, so it opens no file the graph
    names; one missing, unknown or of another shape is refused."""

    name = "onnxruntime"

    def __init__(self, model: bytes, *, providers=None, threads: int | None = None, spinning: bool = True,
                 strict: bool = False, initializers: Mapping[str, np.ndarray] | None = None):
        ort = import_onnxruntime()
        requested = [(_provider_name(p), dict(p[1])) if isinstance(p, (tuple, list)) else _provider_name(p)
                     for p in (providers or ["CPUExecutionProvider"])]
        names = [_provider_name(p) for p in requested]
        available = ort.get_available_providers()
        missing = [p for p in names if p not in available]
        if missing:
            extra = _EXTRA_FOR.get(missing[0], "cpu")
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {missing} are not available here (available: {available}); "
                f"install onnxruntime with them: pip install 'gradprobe[{extra}]' (and not both onnxruntime and "
                "onnxruntime-gpu: they install the same module)")
        options = session_options(threads, spinning)
        if strict and names[0] != "CPUExecutionProvider":
            options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        try:  # the initializers come from a bundle too: ONNX Runtime's refusals become BundleError
            self._initializers = [ort.OrtValue.ortvalue_from_numpy(array) for array in (initializers or {}).values()]
            if initializers:  # the values must outlive the session, which reads them in place
                options.add_external_initializers(list(initializers), self._initializers)
            # a graph loaded from bytes that names external data would have it read relative to the working
            # directory: an empty folder there instead, so only what ``initializers`` hands over is used
            with tempfile.TemporaryDirectory(prefix="gradprobe-no-external-data-") as nowhere:
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", nowhere)
                self.session = ort.InferenceSession(model, options, providers=requested)
        except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise BundleError(f"ONNX Runtime cannot load the graph on {names[0]}: {str(error)[:500]}") from error
        self.providers = self.session.get_providers()
        self.strict = strict
        if self.providers[0] != names[0]:
            raise BackendUnavailableError(f"ONNX Runtime fell back from {names[0]} to {self.providers[0]}; "
                                          "refusing to run on a provider that was not asked for (for CUDA: "
                                          "check that the CUDA and cuDNN libraries onnxruntime-gpu needs load)")
        self._inputs = [_spec(node) for node in self.session.get_inputs()]
        self._outputs = [_spec(node) for node in self.session.get_outputs()]

    def describe(self) -> dict:
        """``provider``: the one that runs the graph (the first; ONNX Runtime lists CPU after it for the
        nodes it keeps there unless ``strict``)."""
        return {"backend": self.name, "providers": list(self.providers), "provider": self.providers[0],
                **({"strict": True} if self.strict else {})}

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names
        return dict(zip(names, self.session.run(names, {name: feeds[name] for name in self.input_names})))

    def close(self) -> None:
        self.session = None
        self._initializers = []
