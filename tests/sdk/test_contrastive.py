"""Probe.contrastive_predict and train-contrastive on the shipped ResNet with real Fashion-MNIST."""
import shutil
import types

import numpy as np
import pytest

import gradprobe
from gradprobe import ContrastiveResult, NotFittedError
from gradprobe.base.manifest import Manifest

from ..base.test_manifest import GOLDEN


def test_contrastive_predict_returns_both_predictions(contrastive_bundles, fmnist_test):
    probe = gradprobe.load(contrastive_bundles["contrastive"])
    images, labels = fmnist_test[0][:300], fmnist_test[1][:300]
    result = probe.contrastive_predict(images)
    assert isinstance(result, ContrastiveResult) and len(result) == 300
    assert result.pred.dtype == result.contrastive_pred.dtype == np.int64
    assert result.probs.shape == result.contrastive_probs.shape == result.contrastive_logits.shape == (300, 10)
    np.testing.assert_allclose(result.contrastive_probs.sum(1), 1, rtol=1e-5)
    assert (result.contrastive_pred == result.contrastive_logits.argmax(1)).all()
    assert (result.changed == (result.pred != result.contrastive_pred)).all()
    assert result.contrastive_pred_names[0] in probe.class_names
    assert (result.contrastive_confidence >= 0.1).all()
    run = probe.run(images)  # the same single engine call also carries the head's outputs
    np.testing.assert_array_equal(run.pred, result.pred)
    np.testing.assert_array_equal(run["contrastive_pred"], result.contrastive_pred)
    # even the quick head (40 steps on 1,000 images) is a working classifier on real test images
    assert (result.contrastive_pred == labels).mean() >= 0.85, (result.contrastive_pred == labels).mean()
    assert ((result.contrastive_pred == result.pred).mean()) >= 0.85


def test_without_a_second_stage_it_says_how_to_train_one(contrastive_bundles, fmnist_test):
    probe = gradprobe.load(contrastive_bundles["contrastive-features"])
    with pytest.raises(NotFittedError, match=r"no trained contrastive second stage: run `gradprobe "
                                             r"train-contrastive .*contrastive-features`"):
        probe.contrastive_predict(fmnist_test[0][:2])
    from gradprobe.contrastive import require_contrastive_head

    old = types.SimpleNamespace(manifest=Manifest.from_json(GOLDEN), path="old")
    with pytest.raises(NotFittedError, match="emits no contrastive features: re-export .*contrastive='compact'"):
        require_contrastive_head(old)


def test_train_contrastive_cli_replaces_the_head_in_place(contrastive_bundles, fmnist_test, tmp_path, capsys):
    """Retraining under the writer lock: one head, a fresh file, the old one gone; a new load sees the same."""
    from gradprobe.cli import main

    copy = tmp_path / "bundle"
    shutil.copytree(contrastive_bundles["contrastive"], copy)
    before = gradprobe.load(copy)
    old_file = before.manifest.heads[0].file
    assert main(["train-contrastive", str(copy), "--variant", "norms", "--limit", "400", "--epochs", "2",
                 "--seed", "3", "--threads", "1"]) == 0
    assert '"variant": "norms"' in capsys.readouterr().out
    after = gradprobe.load(copy)
    head = after.manifest.heads[0]
    assert len(after.manifest.heads) == 1 and head.file != old_file and not (copy / old_file).exists()
    assert head.input_names == ["contrastive_norms"] and head.fit["seed"] == 3 and head.fit["epochs_run"] <= 2
    assert sorted(p.name for p in copy.glob("head-*")) == [head.file]
    # the probe loaded before still runs its snapshot; both agree with their own heads
    assert before.contrastive_predict(fmnist_test[0][:4]).contrastive_probs.shape == (4, 10)
    main(["info", str(copy)])
    assert "head       contrastive: contrastive_norms -> contrastive_logits" in capsys.readouterr().out


def test_train_contrastive_updates_the_loaded_probe(contrastive_bundles, fmnist_test, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(contrastive_bundles["contrastive-features"], copy)
    probe = gradprobe.load(copy)
    images, labels = gradprobe.data.fashion_mnist("train")
    spec = probe.train_contrastive(images[:300], labels[:300], variant="full", max_steps=3, progress=False,
                                   description="300 training images")
    assert spec.fit["data"] == "300 training images" and spec.fit["variant"] == "full"
    assert probe.manifest.heads == (spec,)
    ours = probe.contrastive_predict(fmnist_test[0][:6])
    fresh = gradprobe.load(copy).contrastive_predict(fmnist_test[0][:6])
    np.testing.assert_allclose(ours.contrastive_logits, fresh.contrastive_logits, rtol=1e-6)


@pytest.mark.slow
def test_second_stage_on_the_whole_training_set_keeps_clean_accuracy(contrastive_bundles, fmnist_test, tmp_path):
    """The real recipe (all 60,000 clean training images, early stopping): on the clean test set the contrastive
    prediction is within a point of the feed-forward one (92.4 %)."""
    copy = tmp_path / "bundle"
    shutil.copytree(contrastive_bundles["contrastive-features"], copy)
    probe = gradprobe.load(copy)
    probe.train_contrastive(*gradprobe.data.fashion_mnist("train"), variant="compact", progress=False)
    images, labels = fmnist_test
    result = probe.contrastive_predict(images)
    feed_forward, contrastive = (result.pred == labels).mean(), (result.contrastive_pred == labels).mean()
    assert feed_forward > 0.92 and contrastive > feed_forward - 0.01, (feed_forward, contrastive)
