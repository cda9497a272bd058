"""Runtime behaviour: chunked batches equal one batch, results are typed, the model is what was exported."""
import numpy as np

import gradprobe


def test_chunking_equals_one_batch(exported, fmnist_test):
    _, bundle = exported("resnet18-quarter")
    images = fmnist_test[0][:37]
    whole = gradprobe.load(bundle).run(images)
    chunked = gradprobe.load(bundle, max_batch=8).run(images)
    for name in ("logits", "label_grad_sqnorm", "cam", "contrastive_cam", "pred"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-7)


def test_result_shapes_and_names(exported, fmnist_test):
    _, bundle = exported("resnet18-quarter")
    probe = gradprobe.load(bundle)
    result = probe.run(fmnist_test[0][:3])
    assert len(result) == 3
    assert result.logits.shape == (3, 10) and result.features.shape == (3, 128)
    assert result.cam.shape == (3, 4, 4) and result.confounding_grad_sqnorm.shape == (3, 2)
    assert result.pred_names == [probe.class_names[i] for i in result.pred]
    np.testing.assert_allclose(result.probs.sum(1), 1, rtol=1e-5)
    assert (result.contrast_class != result.pred).all()  # default Q is the runner-up, never P
    assert "layer4.1.relu2" in repr(probe) and probe.providers == ["CPUExecutionProvider"]


def test_pretrained_accuracy_on_real_data(exported, fmnist_test):
    """The shipped checkpoint, through the bundle, on 2,000 real test images (README claims >= 90%)."""
    _, bundle = exported("pretrained")
    images, labels = fmnist_test
    result = gradprobe.load(bundle).run(images[:2000])
    assert (result.pred == labels[:2000]).mean() >= 0.90
