"""Heads in the ProbeEngine: a second graph fed probe outputs by name, run in the same call (torch-free)."""
import json
import shutil

import numpy as np
import pytest

import gradprobe
from gradprobe import BundleError
from gradprobe.base.bundle import Bundle
from gradprobe.runtime import ProbeEngine, build_engine, create_backend

HEAD_OUTPUTS = ["contrastive_logits", "contrastive_probs", "contrastive_pred"]


def _files(bundle: Bundle) -> dict:
    return {name: bundle.read(name) for name in bundle.manifest.files if name.endswith(".onnx")}


def test_one_call_returns_probe_and_head_outputs(contrastive_bundles, fmnist_test):
    bundle = Bundle.open(contrastive_bundles["contrastive"])
    engine = build_engine(bundle.manifest, _files(bundle))
    images = fmnist_test[0][:9]
    outputs = engine.infer(images, {"contrast": np.full(9, -1, np.int64)})
    assert list(outputs) == engine.output_names and engine.output_names[-3:] == HEAD_OUTPUTS
    assert "logits" in outputs and outputs["contrastive_logits"].shape == (9, 10)
    assert engine.describe()["heads"] == ["contrastive"]
    # the head saw exactly the probe graph's r_x of this call
    spec = bundle.manifest.heads[0]
    head = create_backend("onnxruntime", bundle.read(spec.file))
    alone = head.infer({"contrastive_compact": outputs["contrastive_compact"]})
    for name in HEAD_OUTPUTS:
        np.testing.assert_array_equal(outputs[name], alone[name])


def test_heads_run_per_chunk(contrastive_bundles, fmnist_test):
    images = fmnist_test[0][:23]
    whole = gradprobe.load(contrastive_bundles["contrastive"]).run(images)
    chunked = gradprobe.load(contrastive_bundles["contrastive"], max_batch=5).run(images)
    assert list(whole.outputs) == list(chunked.outputs)
    for name in HEAD_OUTPUTS:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


def test_an_engine_without_the_declared_head_backends_is_refused(contrastive_bundles):
    bundle = Bundle.open(contrastive_bundles["contrastive"])
    graph = create_backend("onnxruntime", bundle.read(bundle.manifest.graph))
    with pytest.raises(BundleError, match=r"declares heads \['contrastive'\] but the engine was given backends for "
                                          r"\[\]; build it with gradprobe.runtime.build_engine"):
        ProbeEngine(graph, bundle.manifest)
    with pytest.raises(BundleError, match=r"head 'contrastive': its graph \(\['images', 'contrast'\]"):
        ProbeEngine(graph, bundle.manifest, heads={"contrastive": graph})


def test_a_replaced_head_file_is_refused_on_load(contrastive_bundles, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(contrastive_bundles["contrastive"], copy)
    head = Bundle.open(copy).manifest.heads[0].file
    data = bytearray((copy / head).read_bytes())
    data[-10] ^= 0xFF
    (copy / head).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match the sha256"):
        gradprobe.load(copy)
    (copy / head).unlink()
    with pytest.raises(BundleError):
        gradprobe.load(copy)


def test_a_head_reading_a_missing_output_is_refused_on_load(contrastive_bundles, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(contrastive_bundles["contrastive"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["heads"][0]["inputs"][0]["name"] = "contrastive_elsewhere"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'contrastive_elsewhere' must be an output of the graph or an earlier head"):
        gradprobe.load(copy)
