"""ONNX Runtime on CUDA: explicit providers, no silent CPU fallback, the provider that ran recorded."""
import sys
import types

import numpy as np
import pytest

from gradprobe import BackendUnavailableError
from gradprobe.base.bundle import Bundle
from gradprobe.runtime import create_backend

ort = pytest.importorskip("onnxruntime")
HAVE_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def graph(bundles):
    return Bundle.open(bundles["plain"]).read("probe.onnx")


@pytest.mark.skipif(HAVE_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_onnxruntime_gpu_names_the_extra(graph):
    with pytest.raises(BackendUnavailableError, match=r"CUDAExecutionProvider.*gradprobe\[gpu\].*not both"):
        create_backend("onnxruntime", graph, providers=["cuda"])


def _fake_onnxruntime(monkeypatch, runs_on):
    """onnxruntime whose CUDA provider is listed but whose session comes up on ``runs_on`` (what ORT does
    when libcublas or cuDNN fail to load: it logs and falls back)."""
    entries = []

    class Options:
        log_severity_level = intra_op_num_threads = inter_op_num_threads = 0

        def add_session_config_entry(self, key, value):
            entries.append((key, value))

    class Session:
        def __init__(self, model, options, providers):
            self.requested = providers

        def get_providers(self):
            return runs_on

        def get_inputs(self):
            return []

        get_outputs = get_inputs

    fake = types.SimpleNamespace(SessionOptions=Options, InferenceSession=Session,
                                 get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    return entries


def test_a_session_that_fell_back_to_cpu_is_refused(monkeypatch):
    _fake_onnxruntime(monkeypatch, ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="fell back from CUDAExecutionProvider to CPUExecutionProvider"):
        create_backend("onnxruntime", b"graph", providers=[("cuda", {"device_id": 0})])


def test_the_provider_that_runs_is_recorded_and_strict_forbids_cpu_nodes(monkeypatch):
    entries = _fake_onnxruntime(monkeypatch, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    backend = create_backend("onnxruntime", b"graph", providers=["cuda", "cpu"], strict=True)
    assert backend.session.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert backend.describe() == {"backend": "onnxruntime",
                                  "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  "provider": "CUDAExecutionProvider", "strict": True}
    assert ("session.disable_cpu_ep_fallback", "1") in entries


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="onnxruntime-gpu with the CUDA provider is not installed ('gradprobe[gpu]')")
def test_cuda_provider_matches_cpu(graph, fmnist_test):
    feeds = {"images": fmnist_test[0][:8], "contrast": np.full(8, -1, np.int64)}
    on_cpu = create_backend("onnxruntime", graph).infer(feeds)
    backend = create_backend("onnxruntime", graph, providers=["cuda"])
    assert backend.describe()["provider"] == "CUDAExecutionProvider"
    for name, value in backend.infer(feeds).items():
        np.testing.assert_allclose(value, on_cpu[name], rtol=1e-4, atol=1e-6, err_msg=name)
