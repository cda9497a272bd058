"""The standard test bundles, exported with torch: ``python -m tests.bundles OUT`` writes them for a run
of the runtime tests in a venv without torch (``GRADPROBE_TEST_BUNDLES=OUT``)."""
from __future__ import annotations

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


if __name__ == "__main__":
    for name, path in make_bundles(sys.argv[1]).items():
        print(f"{name}: {path}")
