"""Contrastive features r_x: the graph's closed form equals autograd (one backward per class); the MLP and its head."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch import nn

import gradprobe
from gradprobe.base.errors import ExportError, InputError
from gradprobe.base.manifest import Manifest, TensorSpec
from gradprobe.export.contrastive import (VARIANTS, ContrastiveMLP, contrastive_features, fit_mlp, head_graph,
                                          predict_mlp, reduce_gradients, train_head, variants_of)
from gradprobe.export.parity import RELATIVE, parity_errors
from gradprobe.export.reference import ResearchReference

from ..base.test_manifest import GOLDEN


def _images(kind: str, count: int, fmnist_test) -> np.ndarray:
    if kind == "real":
        images, _ = fmnist_test
        return images[np.random.default_rng(7).choice(len(images), count, replace=False)]
    return np.random.default_rng(count).random((count, 1, 28, 28), dtype=np.float32)


@pytest.mark.parametrize("kind", ["real", "random"])
def test_graph_matches_autograd_for_every_variant(kind, contrastive_bundles, fmnist_test):
    """ORT's r_x (full, compact, norms) vs a full backward of CE(z, i) per class i per image, within 1e-4."""
    probe = gradprobe.load(contrastive_bundles["contrastive-features"])
    images = _images(kind, 5, fmnist_test)
    ours = probe.run(images)
    reference = ResearchReference.for_bundle(gradprobe.models.load_pretrained("resnet-fmnist"), probe.manifest)
    grads = reference.last_layer_gradients(images)
    expected = {f"contrastive_{v}": reduce_gradients(grads, v) for v in VARIANTS}
    errors = parity_errors(ours.as_dict(), expected)
    print(json.dumps({"inputs": kind, "errors": errors}))
    assert max(errors.values()) <= RELATIVE, errors
    assert ours["contrastive_full"].shape == (5, 10, 10, 128) and ours["contrastive_compact"].shape == (5, 10, 128)
    # the layouts say what they claim: compact row i is full[i, i], norms are full's Frobenius norms
    eye = np.arange(10)
    np.testing.assert_allclose(ours["contrastive_compact"], ours["contrastive_full"][:, eye, eye], rtol=1e-6)
    np.testing.assert_allclose(ours["contrastive_norms"], np.sqrt((ours["contrastive_full"].astype(np.float64) ** 2)
                                                                  .sum(axis=(2, 3))), rtol=1e-4)


def test_closed_form_matches_autograd_on_confident_logits():
    """A hand-made head with logits far apart (1 - p_P from 1e-3 down to 0 in float64): the norm at i = P is tiny
    and must not cancel."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    features = torch.rand(5, 6, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.mul_(200)
    logits = linear(features)
    probs = torch.softmax(logits, dim=1)
    assert (1 - probs.max(dim=1).values).min() < 1e-8
    grads = []
    for sample in range(len(features)):
        rows = []
        for label in range(4):
            linear.zero_grad()
            nn.functional.cross_entropy(linear(features[sample:sample + 1]), torch.tensor([label])).backward()
            rows.append(linear.weight.grad.clone().numpy())
        grads.append(rows)
    grads = np.array(grads)
    for variant in VARIANTS:
        ours = contrastive_features(variant, probs, features).detach().numpy()
        errors = parity_errors({variant: ours}, {variant: reduce_gradients(grads, variant)}, floor=1e-300)
        assert errors[variant] <= 1e-9, (variant, errors)


def test_variant_choices_are_checked_before_any_work():
    assert variants_of(None) == () and variants_of("norms") == ("norms",)
    assert variants_of(["compact", "full"]) == ("compact", "full")
    for bad in ("huge", [], ["compact", "compact"], ["compact", 3]):
        with pytest.raises(InputError, match="contrastive must be None, one of"):
            variants_of(bad)
    with pytest.raises(InputError, match="contrastive must be None"):
        gradprobe.export(nn.Linear(2, 2), np.zeros((1, 1, 2, 2), np.float32), "/nonexistent/x", contrastive="huge")


def test_fit_mlp_stops_early_and_keeps_the_best_epoch():
    """Separable synthetic data: held-out accuracy saturates, training stops ``patience`` epochs after the best."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    data = torch.from_numpy(6 * np.eye(3, 5, dtype=np.float32)[labels] + rng.normal(0, 1, (2000, 5)).astype(np.float32))
    options = dict(seed=1, hidden=(16, 8), max_epochs=40, patience=2, lr=1e-2, progress=False)
    mlp, report = fit_mlp(lambda index: data[index], labels, 3, **options)
    assert report.epochs == report.best_epoch + 2 < 40, report
    assert report.curve[report.best_epoch - 1] == max(report.curve) == report.held_out_accuracy
    held = np.random.default_rng(1).permutation(2000)[:200]
    accuracy = (predict_mlp(mlp, lambda index: data[held[index]], 200).argmax(1) == labels[held]).mean()
    assert accuracy == pytest.approx(report.held_out_accuracy) and accuracy > 0.95
    again, _ = fit_mlp(lambda index: data[index], labels, 3, **options)
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), again.state_dict().values()))  # seeded


def test_head_graph_equals_the_torch_mlp():
    torch.manual_seed(0)
    mlp = ContrastiveMLP(3 * 4, 3, hidden=(8, 8)).eval()
    with torch.no_grad():
        mlp.mean.uniform_(-1, 1)
        mlp.scale.uniform_(0.5, 2)
    spec = TensorSpec("contrastive_compact", "float32", ("B", 3, 4))
    data, head = head_graph(mlp, spec, 3)
    assert head.name == "contrastive" and head.file.startswith("head-contrastive-") and head.inputs == (spec,)
    from gradprobe.runtime import create_backend

    x = np.random.default_rng(0).normal(size=(7, 3, 4)).astype(np.float32)
    got = create_backend("onnxruntime", data).infer({"contrastive_compact": x})
    with torch.no_grad():
        logits = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got["contrastive_logits"], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["contrastive_probs"].sum(1), 1, rtol=1e-6)
    assert (got["contrastive_pred"] == logits.argmax(1)).all()


def test_train_head_needs_a_bundle_that_emits_r_x():
    probe = types.SimpleNamespace(manifest=Manifest.from_json(GOLDEN), path="old-bundle")
    with pytest.raises(InputError, match=r"emits no contrastive features: re-export it with .*contrastive='compact'"):
        train_head(probe, np.zeros((2, 1, 28, 28), np.float32), np.zeros(2, np.int64))


def test_train_head_refuses_bad_labels(contrastive_bundles):
    probe = gradprobe.load(contrastive_bundles["contrastive-features"])
    images = np.zeros((4, 1, 28, 28), np.float32)
    with pytest.raises(InputError, match=r"labels must lie in \[0, 9\]"):
        train_head(probe, images, np.array([0, 1, 2, 10]))
    with pytest.raises(InputError, match="labels must be integers"):
        train_head(probe, images, np.zeros(3, np.int64))
    with pytest.raises(InputError, match="not 'huge'"):
        train_head(probe, images, np.zeros(4, np.int64), variant="huge")


def test_a_closed_form_that_disagrees_with_the_graph_is_refused(contrastive_bundles, fmnist_test, monkeypatch):
    """Training reads r_x off (p, h) with the closed form; a graph computing something else must not pass."""
    from gradprobe.export import contrastive

    probe = gradprobe.load(contrastive_bundles["contrastive-features"])
    real = contrastive.contrastive_features
    monkeypatch.setattr(contrastive, "contrastive_features", lambda v, p, h: real(v, p, h) * 1.01)
    with pytest.raises(ExportError, match="differs from its closed form"):
        train_head(probe, fmnist_test[0][:20], fmnist_test[1][:20], variant="norms", progress=False)
