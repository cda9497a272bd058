"""A bundle whose graph keeps its weights beside it (models over 2 GiB) on the deployed path: numpy and ONNX
Runtime only (``make test-runtime`` runs this in a venv without torch and onnx)."""
from __future__ import annotations

import numpy as np

import gradprobe


def test_weights_apart_run_as_the_whole_graph(bundles, fmnist_test):
    apart, whole = gradprobe.load(bundles["apart"]), gradprobe.load(bundles["plain"])
    assert apart.manifest.graph_weights is not None and whole.manifest.graph_weights is None
    images = fmnist_test[0][:32]
    contrast = np.arange(32) % 11 - 1
    got, expected = apart.run(images, contrast), whole.run(images, contrast)
    assert set(got.outputs) == set(expected.outputs)
    for name in expected.outputs:
        np.testing.assert_allclose(got.outputs[name], expected.outputs[name], rtol=1e-5, atol=1e-7, err_msg=name)
