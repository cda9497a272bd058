"""The backend contract: declared specs, one place for feed checks, registration by name, no change elsewhere."""
from typing import Mapping

import numpy as np
import pytest

import gradprobe
from gradprobe import BackendUnavailableError, InputError
from gradprobe.base.bundle import Bundle
from gradprobe.base.manifest import TensorSpec
from gradprobe.runtime import Backend, backend_names, create_backend, register_backend


class ReferenceEvaluatorBackend(Backend):
    """ONNX's own pure-numpy evaluator as a second backend: proves a backend plugs in by registration alone."""

    name = "onnx-reference"

    def __init__(self, model: bytes, **options):
        onnx = pytest.importorskip("onnx")
        from onnx.reference import ReferenceEvaluator

        self.model = onnx.load_from_string(model)
        self.evaluator = ReferenceEvaluator(self.model)

    def _specs(self, values):
        kinds = {1: "float32", 7: "int64", 11: "float64"}
        return [TensorSpec(v.name, kinds[v.type.tensor_type.elem_type],
                           tuple(d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim)) for v in values]

    @property
    def input_specs(self):
        return self._specs(self.model.graph.input)

    @property
    def output_specs(self):
        return self._specs(self.model.graph.output)

    def _infer(self, feeds: Mapping[str, np.ndarray]):
        return dict(zip(self.output_names, self.evaluator.run(None, dict(feeds))))


register_backend("onnx-reference", f"{__name__}:ReferenceEvaluatorBackend")


def test_a_registered_backend_runs_through_the_whole_sdk(bundles, fmnist_test):
    images = fmnist_test[0][:2]
    ours = gradprobe.load(bundles["plain"], backend="onnx-reference").run(images, "Coat")
    onnxruntime = gradprobe.load(bundles["plain"]).run(images, "Coat")
    assert "onnx-reference" in backend_names() and list(ours.outputs) == list(onnxruntime.outputs)
    for name, value in onnxruntime.outputs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_onnxruntime_declares_its_specs_and_checks_feeds_once(bundles):
    bundle = Bundle.open(bundles["plain"])
    backend = create_backend("onnxruntime", bundle.read("probe.onnx"), threads=1, spinning=False)
    assert [s.name for s in backend.input_specs] == ["images", "contrast"]
    assert backend.input_specs[0].dtype == "float32" and backend.input_specs[0].shape[1:] == (1, 28, 28)
    assert backend.output_names == [spec.name for spec in bundle.manifest.outputs]
    assert backend.describe() == {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"],
                                  "provider": "CPUExecutionProvider"}
    good = {"images": np.zeros((2, 1, 28, 28), np.float32), "contrast": np.full(2, -1, np.int64)}
    assert backend.infer(good)["logits"].shape == (2, 10)
    with pytest.raises(InputError, match="feed 'contrast' is missing"):
        backend.infer({"images": good["images"]})
    with pytest.raises(InputError, match=r"feed 'images' must be float32 of shape \['batch', 1, 28, 28\]"):
        backend.infer({**good, "images": np.zeros((2, 1, 27, 28), np.float32)})
    with pytest.raises(InputError, match="feed 'contrast' must be int64"):
        backend.infer({**good, "contrast": np.zeros(2, np.int32)})
    with backend:
        pass
    assert backend.session is None


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendUnavailableError, match=r"unknown backend 'tpu'.*onnxruntime"):
        create_backend("tpu", b"")
