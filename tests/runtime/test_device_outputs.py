"""The engine's hand-over to a backend after the norms are complete (``Backend.finish``), as the TensorRT
backend uses it: the kernels fill the tap columns where the outputs live, then the backend copies them out."""
import numpy as np
import pytest

from gradprobe import InputError
from gradprobe.base.bundle import Bundle
from gradprobe.runtime import ProbeEngine
from gradprobe.runtime.onnxruntime_backend import OnnxRuntimeBackend


class HandingOver(OnnxRuntimeBackend):
    """ONNX Runtime, recording what ``finish`` receives; ``keep`` wraps outputs as a device backend would."""

    def __init__(self, model, keep=False):
        super().__init__(model, threads=1)
        self.received, self.keep = [], keep

    def finish(self, outputs):
        self.received.append(dict(outputs))
        return {name: _Opaque(value) for name, value in outputs.items()} if self.keep else outputs


class _Opaque:
    def __init__(self, value):
        self.value = value


@pytest.fixture(scope="module")
def deep(bundles):
    bundle = Bundle.open(bundles["deep"])
    return bundle, bundle.read("probe.onnx")


def test_finish_sees_completed_norms_and_no_taps(deep, fmnist_test):
    bundle, graph = deep
    backend = HandingOver(graph)
    engine = ProbeEngine(backend, bundle.manifest, max_batch=3)
    outputs = engine.infer(fmnist_test[0][:5], {"contrast": np.full(5, -1, np.int64)})
    assert len(backend.received) == 2  # once per chunk
    for received in backend.received:
        assert not any(name.startswith("tap_") for name in received)
        taps = [tap.column for tap in bundle.manifest.classifier.layer_grads.taps]
        assert np.all(received["layer_grad_sqnorm"][:, taps] > 0)
    assert outputs["layer_grad_sqnorm"].shape[0] == 5


def test_device_outputs_are_not_concatenated_across_chunks(deep, fmnist_test):
    bundle, graph = deep
    engine = ProbeEngine(HandingOver(graph, keep=True), bundle.manifest, max_batch=2)
    assert isinstance(engine.infer(fmnist_test[0][:2], {"contrast": np.full(2, -1, np.int64)})["logits"], _Opaque)
    with pytest.raises(InputError, match="device outputs come one chunk at a time: pass at most 2 images"):
        engine.infer(fmnist_test[0][:3], {"contrast": np.full(3, -1, np.int64)})
