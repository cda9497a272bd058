"""The standard test bundles, exported with torch: ``python -m tests.bundles OUT`` writes them (and the
contrastive ones) for a run of the runtime tests in a venv without torch (``GRADPROBE_TEST_BUNDLES=OUT``)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gradprobe

#: name -> what it is
BUNDLES = {"plain": "the shipped ResNet, maps and last-layer norms",
           "deep": "the shipped ResNet with layer_grads=True",
           "calibrated": "deep, with a 'paper' detector fitted on Fashion-MNIST vs digits"}


def make_bundles(folder: str | Path) -> dict[str, Path]:
    from gradprobe.data import fmnist_part, ood_set
    from gradprobe.models import load_pretrained

    folder = Path(folder)
    model = load_pretrained("resnet-fmnist")
    example = gradprobe.data.fashion_mnist("test")[0][:4]
    paths = {"plain": gradprobe.export(model, example, folder / "plain"),
             "deep": gradprobe.export(model, example, folder / "deep", layer_grads=True),
             "calibrated": gradprobe.export(model, example, folder / "calibrated", layer_grads=True)}
    gradprobe.load(paths["calibrated"]).calibrate(fmnist_part("fit", 600)[0], ood_set("digits", "fit", 300),
                                                  kind="paper")
    return paths


#: name -> what it is (made by ``make_contrastive_bundles``, apart from BUNDLES so other tests do not wait for them)
CONTRASTIVE_BUNDLES = {"contrastive-features": "the shipped ResNet emitting r_x (compact, norms, full), no head",
                       "contrastive": "contrastive-features with a quickly trained contrastive head (compact)"}
#: The quick second stage: clean Fashion-MNIST train images, optimizer steps (a shape-and-plumbing head).
QUICK_HEAD_IMAGES, QUICK_HEAD_STEPS = 1000, 40


def make_contrastive_bundles(folder: str | Path) -> dict[str, Path]:
    from gradprobe.models import load_pretrained

    folder = Path(folder)
    example = gradprobe.data.fashion_mnist("test")[0][:4]
    features = gradprobe.export(load_pretrained("resnet-fmnist"), example, folder / "contrastive-features",
                                contrastive=("compact", "norms", "full"))
    trained = folder / "contrastive"
    shutil.rmtree(trained, ignore_errors=True)
    shutil.copytree(features, trained)
    images, labels = gradprobe.data.fashion_mnist("train")
    gradprobe.load(trained, threads=1).train_contrastive(images[:QUICK_HEAD_IMAGES], labels[:QUICK_HEAD_IMAGES],
                                                         variant="compact", max_steps=QUICK_HEAD_STEPS, progress=False)
    return {"contrastive-features": features, "contrastive": trained}


if __name__ == "__main__":
    for name, path in {**make_bundles(sys.argv[1]), **make_contrastive_bundles(sys.argv[1])}.items():
        print(f"{name}: {path}")
