"""``gradprobe demo``: the shipped checkpoint end to end - export, run, explain, detect."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _rule(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 74 - len(text)))


def run_demo(out: str = "gradprobe-demo", *, threads: int = 2) -> dict:
    """Returns what it printed as numbers: accuracy, bundle path, picture path."""
    import gradprobe
    from gradprobe.models import load_pretrained
    from gradprobe.viz import explanation_figure

    out = Path(out)
    images, labels = gradprobe.data.fashion_mnist("test")

    _rule("1. export the shipped ResNet with its probe graph")
    model = load_pretrained("resnet-fmnist")
    started = time.perf_counter()
    bundle = gradprobe.export(model, images[:8], out / "bundle")
    manifest = gradprobe.load(bundle).manifest
    section = manifest.classifier
    size = sum(f.stat().st_size for f in bundle.iterdir())
    print(f"bundle {bundle}  ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f} s)")
    print(f"target layer {section.target_layer} {list(section.target_shape)}, last Linear {section.linear!r}, "
          f"{len(section.class_names)} classes, maps {[m.name for m in section.maps]}, max |ORT - torch| / "
          f"max|torch| at export: {max(manifest.export['verified_against_torch'].values()):.1e}")

    _rule("2. run the Fashion-MNIST test set through ONNX Runtime (no torch)")
    probe = gradprobe.load(bundle, threads=threads)
    started = time.perf_counter()
    result = probe.run(images)
    elapsed = time.perf_counter() - started
    correct = result.pred == labels
    accuracy = float(correct.mean())
    print(f"{len(images)} images in {elapsed:.1f} s: accuracy {accuracy:.2%}")
    weight_norm = result.confounding_grad_sqnorm[:, 0]
    print(f"confounding-label gradient ||dJ/dW||^2 (all-ones label): median {np.median(weight_norm[correct]):.3g} "
          f"on correct predictions, {np.median(weight_norm[~correct]):.3g} on the {int((~correct).sum())} wrong ones")

    _rule("3. a few predictions")
    names = probe.class_names
    print(f"{'#':>5}  {'true':<12} {'predicted':<12} {'p':>5}  {'runner-up':<12} {'||dJ/dW||^2':>11} {'||dJ/db||^2':>11}")
    picks = list(np.flatnonzero(correct)[:4]) + list(np.flatnonzero(~correct)[:2])
    for index in picks:
        print(f"{index:>5}  {names[labels[index]]:<12} {names[result.pred[index]]:<12} "
              f"{result.probs[index, result.pred[index]]:5.2f}  {names[result.contrast_class[index]]:<12} "
              f"{result.confounding_grad_sqnorm[index, 0]:11.4g} {result.confounding_grad_sqnorm[index, 1]:11.4g}")

    _rule("4. explanations: why P? why P rather than Q? what if not P?")
    subset = np.array(picks)
    picture = explanation_figure(images[subset], probe.explain(images[subset]), out / "explanations.png",
                                 labels=labels[subset], title="gradprobe on the shipped ResNet (Fashion-MNIST test)")
    print(f"wrote {picture}")

    print("\nlatency side by side (probe graph vs plain forward vs eager reference vs GradCAM): run "
          f"`gradprobe bench {bundle}` from a source checkout")
    return {"accuracy": accuracy, "bundle": str(bundle), "picture": str(picture)}
