"""The standard test bundles, exported with torch: ``python -m tests.bundles OUT`` writes them (and the
contrastive and GradCon ones) for a run of the runtime tests in a venv without torch (``GRADPROBE_TEST_BUNDLES=OUT``)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gradprobe

#: name -> what it is
BUNDLES = {"plain": "the shipped ResNet, maps and last-layer norms",
           "deep": "the shipped ResNet with layer_grads=True",
           "calibrated": "deep, with a 'paper' detector fitted on Fashion-MNIST vs digits",
           "apart": "plain, with the graph's weights in a file beside it (what models over 2 GiB get)"}


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    """A copy of a test bundle that a test may damage."""
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def edit_manifest(folder: Path, change) -> None:
    """Apply ``change(manifest_dict)`` to the bundle's manifest.json in place."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def make_bundles(folder: str | Path) -> dict[str, Path]:
    from gradprobe.data import fmnist_part, ood_set
    from gradprobe.export import pipeline
    from gradprobe.models import load_pretrained

    folder = Path(folder)
    model = load_pretrained("resnet-fmnist")
    example = gradprobe.data.fashion_mnist("test")[0][:4]
    paths = {"plain": gradprobe.export(model, example, folder / "plain"),
             "deep": gradprobe.export(model, example, folder / "deep", layer_grads=True),
             "calibrated": gradprobe.export(model, example, folder / "calibrated", layer_grads=True)}
    gradprobe.load(paths["calibrated"]).calibrate(fmnist_part("fit", 600)[0], ood_set("digits", "fit", 300),
                                                  kind="paper")
    threshold, pipeline.WEIGHTS_APART_ABOVE = pipeline.WEIGHTS_APART_ABOVE, 0
    try:
        paths["apart"] = gradprobe.export(model, example, folder / "apart")
    finally:
        pipeline.WEIGHTS_APART_ABOVE = threshold
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


#: name -> what it is (made by ``make_gradcon_bundles``, apart from BUNDLES so other tests do not wait for it)
GRADCON_BUNDLES = {"gradcon": "a GradCon detector of trousers (class 1) after 40 training steps, threshold calibrated"}


def make_gradcon_bundles(folder: str | Path) -> dict[str, Path]:
    """Trained briefly on the GPND training folds of class 1, calibrated on its validation fold (max F1)."""
    from gradprobe.data import fashion_mnist_pooled, gpnd_folds, gpnd_split
    from gradprobe.export.gradcon import QUICK, train_gradcon

    images, labels = fashion_mnist_pooled()
    split = gpnd_split(labels, gpnd_folds(labels), normal_class=1, outlier_percent=50)
    model, _ = train_gradcon(images[split["train"]][:QUICK["train_limit"]], epochs=1, max_steps=QUICK["max_steps"],
                             progress=False)
    val, is_outlier = images[split["val"]][::4], split["val_outlier"][::4]
    path = gradprobe.export(model, val[:4], Path(folder) / "gradcon",
                            training={"normal_class": 1, "steps": QUICK["max_steps"]})
    with gradprobe.load(path) as probe:
        probe.calibrate(val[~is_outlier], val[is_outlier])
    return {"gradcon": path}


if __name__ == "__main__":
    for name, path in {**make_bundles(sys.argv[1]), **make_contrastive_bundles(sys.argv[1]),
                       **make_gradcon_bundles(sys.argv[1])}.items():
        print(f"{name}: {path}")
