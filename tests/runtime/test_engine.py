"""The ProbeEngine on real bundles: chunking, typed results, taps completed by the kernels, manifest checks."""
import dataclasses

import numpy as np
import pytest

import gradprobe
from gradprobe import BundleError, InputError
from gradprobe.base.bundle import Bundle
from gradprobe.runtime import ProbeEngine, create_backend


def _engine(path, **options):
    bundle = Bundle.open(path)
    return ProbeEngine(create_backend("onnxruntime", bundle.read(bundle.manifest.graph)), bundle.manifest, **options)


def test_chunking_equals_one_batch(bundles, fmnist_test):
    images = fmnist_test[0][:37]
    whole = gradprobe.load(bundles["deep"]).run(images)
    chunked = gradprobe.load(bundles["deep"], max_batch=8).run(images)
    assert list(whole.outputs) == list(chunked.outputs)
    for name in whole.outputs:
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-7)


def test_result_shapes_and_names(bundles, fmnist_test):
    probe = gradprobe.load(bundles["plain"])
    result = probe.run(fmnist_test[0][:3])
    assert len(result) == 3
    assert result.logits.shape == (3, 10) and result.features.shape == (3, 128)
    assert result.cam.shape == (3, 4, 4) and result.confounding_grad_sqnorm.shape == (3, 2)
    assert set(result.maps) == {"cam", "contrastive_cam", "counterfactual_cam", "gradcam_pp"}
    assert result.pred_names == [probe.class_names[i] for i in result.pred]
    np.testing.assert_allclose(result.probs.sum(1), 1, rtol=1e-5)
    assert (result.contrast_class != result.pred).all()  # default Q is the runner-up, never P
    assert "target_layer='layer4'" in repr(probe) and probe.providers == ["CPUExecutionProvider"]
    with pytest.raises(AttributeError, match="no output 'nonsense'"):
        result.nonsense


def test_pretrained_accuracy_on_real_data(bundles, fmnist_test):
    """The shipped checkpoint, through the bundle, on 2,000 real test images (README claims >= 90%)."""
    images, labels = fmnist_test
    result = gradprobe.load(bundles["plain"]).run(images[:2000])
    assert (result.pred == labels[:2000]).mean() >= 0.90


def test_taps_are_completed_by_the_kernels_and_dropped(bundles, fmnist_test):
    """The deep graph leaves early conv weights to the kernels: the engine fills those columns from the taps."""
    from gradprobe import kernels

    engine = _engine(bundles["deep"])
    images = fmnist_test[0][:5]
    feeds = {"images": images, "contrast": np.full(5, -1, np.int64)}
    raw = engine.backend.infer(feeds)
    done = engine.infer(images, {"contrast": feeds["contrast"]})
    taps = engine.manifest.classifier.layer_grads.taps
    assert taps and not any(name.startswith("tap_") for name in done)
    for tap in taps:
        assert (raw["layer_grad_sqnorm"][:, tap.column] == 0).all()
        expected = kernels.conv_weight_sqnorm(raw[tap.input], raw[tap.grad], tap.conv, form="gram")
        np.testing.assert_allclose(done["layer_grad_sqnorm"][:, tap.column], expected, rtol=1e-4)
        assert (done["layer_grad_sqnorm"][:, tap.column] > 0).all()


def test_engine_refuses_a_manifest_that_does_not_describe_the_graph(bundles):
    bundle = Bundle.open(bundles["plain"])
    renamed = dataclasses.replace(bundle.manifest, outputs=bundle.manifest.outputs[::-1])
    with pytest.raises(BundleError, match="not the one its manifest describes"):
        ProbeEngine(create_backend("onnxruntime", bundle.read("probe.onnx")), renamed)


def test_a_tap_that_does_not_fit_its_convolution_is_refused(bundles, fmnist_test):
    bundle = Bundle.open(bundles["deep"])
    section = bundle.manifest.classifier
    tap = section.layer_grads.taps[0]
    wrong = dataclasses.replace(tap, conv=dataclasses.replace(tap.conv, padding=(3, 3)))
    layer_grads = dataclasses.replace(section.layer_grads, taps=(wrong, *section.layer_grads.taps[1:]))
    manifest = dataclasses.replace(bundle.manifest, section=dataclasses.replace(section, layer_grads=layer_grads))
    engine = ProbeEngine(create_backend("onnxruntime", bundle.read("probe.onnx")), manifest)
    with pytest.raises(BundleError, match="does not fit its convolution"):
        engine.infer(fmnist_test[0][:2], {"contrast": np.full(2, -1, np.int64)})


def test_max_batch_must_be_positive(bundles):
    with pytest.raises(InputError, match="max_batch"):
        gradprobe.load(bundles["plain"], max_batch=0)
