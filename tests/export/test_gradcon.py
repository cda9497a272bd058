"""GradCon: the model, the gradient-constrained training, and the forward-only score graph against autograd."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradprobe  # noqa: E402
from gradprobe.base.bundle import Bundle  # noqa: E402
from gradprobe.base.errors import BundleError, ExportError, InputError  # noqa: E402
from gradprobe.data import fashion_mnist, fashion_mnist_pooled, gpnd_folds, gpnd_split  # noqa: E402
from gradprobe.export import gradcon as gc  # noqa: E402
from gradprobe.export.gradcon_graph import (OUTPUT_NAMES, GradConScore, autograd_reference,  # noqa: E402
                                            score_onnx, vmap_reference)

PARITY = 1e-4  # the bound for the deployed score against per-sample autograd


@pytest.fixture(scope="module")
def trained():
    """A GradCon model after 30 real training steps on Fashion-MNIST T-shirts: non-trivial references."""
    images, labels = fashion_mnist("train")
    model, record = gc.train_gradcon(images[labels == 0][:1920], epochs=1, max_steps=30, seed=0, progress=False)
    return model, record


@pytest.fixture(scope="module")
def test_images():
    images, _ = fashion_mnist("test")
    return torch.from_numpy(images[:24])


def test_parameter_count_is_the_papers():
    assert gc.parameter_count(gc.GradConCAE(1)) == 230_721
    assert gc.parameter_count(gc.GradConCAE(3)) == 232_771


def test_shapes_follow_the_authors_layout():
    model = gc.GradConCAE(1)
    x = torch.rand(2, 1, 28, 28)
    assert model.down(x).shape == (2, 64, 3, 3)
    assert model(x).shape == (2, 1, 28, 28)
    assert [tuple(w.shape) for w in model.decoder_weights()] == [(64, 64, 4, 4), (64, 32, 4, 4),
                                                                 (32, 32, 4, 4), (32, 1, 4, 4)]


def test_references_are_the_running_mean_of_the_gradients_of_j():
    torch.manual_seed(0)
    model = gc.GradConCAE(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.from_numpy(fashion_mnist("test")[0][:64 * 4])
    seen = []
    for step in range(4):
        recon, grad_loss = gc.training_step(model, optimizer, images[step * 64:(step + 1) * 64])
        if step == 0:
            assert grad_loss == 0.0  # no history at the first iteration: L alone
        seen.append([w.grad.clone() for w in model.decoder_weights()])
    assert int(model.reference_count) == 4
    for index, reference in enumerate(model.references()):
        expected = torch.stack([grads[index] for grads in seen]).mean(0)
        torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-9)


def test_the_constraint_is_differentiated(trained):
    """Second order: J's gradient on the encoder differs from L's (the cosine depends on the encoder)."""
    model = gc.GradConCAE(1).eval()
    model.load_state_dict(trained[0].state_dict())
    images = torch.from_numpy(fashion_mnist("test")[0][:64])
    encoder = model.down[0].weight
    loss, recon, grad_loss = gc.gradcon_objective(model, images, alpha=gc.ALPHA)
    g_j = torch.autograd.grad(loss, encoder, retain_graph=True)[0]
    g_l = torch.autograd.grad(recon, encoder, retain_graph=True)[0]
    g_c = torch.autograd.grad(grad_loss, encoder)[0]
    assert float(g_c.norm()) > 0
    torch.testing.assert_close(g_j, g_l + gc.ALPHA * g_c, rtol=1e-4, atol=1e-9)


def test_score_graph_matches_per_sample_autograd(trained, test_images):
    model, _ = trained
    with torch.no_grad():
        ours = GradConScore(model)(test_images)
    loop = autograd_reference(model, test_images)
    mapped = vmap_reference(model, test_images)
    for name, a, b, c in zip(OUTPUT_NAMES, ours, loop, mapped):
        assert float((a - b).abs().max()) < PARITY, name
        assert float((c - b).abs().max()) < PARITY, name
    score, normality, recon, cosine = ours
    torch.testing.assert_close(score, -normality)
    torch.testing.assert_close(normality, -recon + gc.BETA * cosine.mean(1))
    assert float(cosine.std()) > 1e-3  # the references are informative, not degenerate


def test_score_graph_is_exact_in_float64(trained, test_images):
    model = gc.GradConCAE(1)
    model.load_state_dict(trained[0].state_dict())
    model = model.double().eval()
    with torch.no_grad():
        ours = GradConScore(model).double()(test_images.double())
    for name, a, b in zip(OUTPUT_NAMES, ours, autograd_reference(model, test_images.double())):
        assert float((a - b).abs().max()) < 1e-12, name


def test_onnx_graph_runs_in_onnxruntime_with_a_symbolic_batch(trained, test_images):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from gradprobe.runtime import create_backend

    model, _ = trained
    graph, problems, _ = score_onnx(GradConScore(model), test_images[:5])
    assert problems == []  # parses in TensorRT's ONNX parser (op allow-list)
    proto = onnx.load_from_string(graph)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    backend = create_backend("onnxruntime", graph, threads=1)
    reference = autograd_reference(model, test_images)
    for batch in (1, 7, 24):
        got = backend.infer({"images": test_images[:batch].numpy()})
        for name, expected in zip(OUTPUT_NAMES, reference):
            assert got[name].shape == tuple(expected[:batch].shape)
            assert np.abs(got[name] - expected[:batch].numpy()).max() < PARITY, (name, batch)


def test_export_dispatches_gradcon_models_and_records_parity(trained, test_images, tmp_path):
    model, _ = trained
    path = gradprobe.export(model, test_images[:4].numpy(), tmp_path / "bundle", training={"normal_class": 0})
    manifest = Bundle.open(path).manifest
    assert manifest.kind == "gradcon" and manifest.gradcon.training == {"normal_class": 0}
    assert manifest.gradcon.decoder_weights == model.decoder_weight_names()
    assert max(manifest.export["max_abs_error_vs_autograd"].values()) < PARITY
    assert manifest.export["tensorrt_problems"] == []
    weights, _ = gc.load_gradcon(Bundle.open(path).read(manifest.model.weights))
    for a, b in zip(weights.references(), model.references()):
        assert torch.equal(a, b)  # the references travel with the bundle
    with pytest.raises(InputError, match="example_input"):
        gradprobe.export(model, np.zeros((2, 1, 32, 32), np.float32), tmp_path / "bad")


def test_checkpoint_round_trip_keeps_the_references(trained, tmp_path):
    model, _ = trained
    path = gc.save_gradcon(model, tmp_path / "m.safetensors", normal_class=0)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"[:8]  # safetensors header, not a pickle
    loaded, metadata = gc.load_gradcon(path)
    assert metadata["normal_class"] == 0 and metadata["config"]["arch"] == gc.ARCH
    assert int(loaded.reference_count) == int(model.reference_count)
    for a, b in zip(loaded.references(), model.references()):
        assert torch.equal(a, b)


def test_untrained_models_and_foreign_files_are_refused(tmp_path):
    from gradprobe.export.checkpoint import save_checkpoint
    from gradprobe.models import build_model

    with pytest.raises(ExportError, match="train"):
        GradConScore(gc.GradConCAE(1))
    gc.save_gradcon(gc.GradConCAE(1), tmp_path / "untrained.safetensors")
    with pytest.raises(BundleError, match="never trained"):
        gc.load_gradcon(tmp_path / "untrained.safetensors")
    save_checkpoint(build_model("vgg"), tmp_path / "vgg.safetensors")
    with pytest.raises(BundleError, match="train-gradcon"):
        gc.load_gradcon(tmp_path / "vgg.safetensors")


def test_bad_training_input_says_what_is_expected():
    with pytest.raises(InputError, match=r"\[N, C, 28, 28\]"):
        gc.train_gradcon(np.zeros((4, 28, 28), np.float32))
    with pytest.raises(InputError, match="float32"):
        gc.train_gradcon(np.zeros((4, 1, 28, 28), np.float64))


def test_snapshots_equal_shorter_runs():
    images = fashion_mnist("test")[0][:128]
    shorter, _ = gc.train_gradcon(images, images[:64], epochs=1, seed=3, progress=False)
    saved = {}
    gc.train_gradcon(images, images[:64], epochs=2, seed=3, progress=False,
                     snapshots={1: lambda model, record: saved.update(model=model, record=record)})
    assert saved["record"]["epochs"] == 1
    for key, value in shorter.state_dict().items():
        torch.testing.assert_close(saved["model"].state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_gradcon_beats_chance_by_far_after_a_few_epochs():
    from sklearn.metrics import roc_auc_score

    images, labels = fashion_mnist_pooled()
    split = gpnd_split(labels, gpnd_folds(labels), normal_class=7, outlier_percent=50)
    val = split["val"][~split["val_outlier"]]
    model, record = gc.train_gradcon(images[split["train"]], images[val], epochs=3, progress=False)
    assert 1 <= record["best_epoch"] <= 3
    with torch.no_grad():
        score, _, recon, _ = GradConScore(model)(torch.from_numpy(images[split["test"]]))
    assert roc_auc_score(split["test_outlier"], score.numpy()) > 0.9
