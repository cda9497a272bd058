"""Deletion and insertion AUC of the explanation maps (Petsiuk et al., RISE, BMVC 2018), shipped ResNet, ORT.

Deletion: remove the most salient pixels first, STEP pixels at a time, and track p_P (P = the class predicted
on the intact image); a faithful map makes p_P fall fast (low AUC). Insertion: start from the fully removed
image and add the most salient pixels first (high AUC). "Removed" is a baseline value per pixel: ``black`` (0,
the Fashion-MNIST background) and ``blur`` (Gaussian, sigma 3 px). Ties in a map (e.g. zeros after the ReLU)
are broken at random, so an empty map behaves like the random map. AUC: numpy.trapezoid over the fraction of
pixels in [0, 1]. Every probability comes from the bundle's logits subgraph in ONNX Runtime.

    .venv/bin/python benchmarks/explain_faithfulness.py [--count 1000] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from explain_common import peer_spec, run_peers, write_results

METHODS = {"gradcam": "Grad-CAM (ours), why P?", "contrastive": "contrastive (ours), why P rather than Q (runner-up)?",
           "counterfactual": "counterfactual (ours), what if not P?", "random": "random map (uniform noise)",
           "pytorch-grad-cam": "pytorch_grad_cam.GradCAM (peers venv)"}


def _baselines(images):
    from scipy.ndimage import gaussian_filter

    return {"black": np.zeros_like(images), "blur": gaussian_filter(images, sigma=(0, 0, 3, 3)).astype(np.float32)}


def curves(session, images, baseline, saliency, pred, steps, rng, chunk=32):
    """p_P after deleting / inserting the top k pixels, k = 0, STEP, ..., all: two arrays [N, steps + 1]."""
    count, pixels = len(images), images[0, 0].size
    order = np.stack([np.lexsort((rng.random(pixels), -s.ravel())) for s in saliency])  # most salient first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pixels)[None].repeat(count, 0), axis=1)
    ks = np.linspace(0, pixels, steps + 1).round().astype(int)
    out = {"deletion": np.empty((count, len(ks))), "insertion": np.empty((count, len(ks)))}
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        masks = (rank[part][:, None, :] < ks[None, :, None]).reshape(-1, 1, *images.shape[2:])  # [n*K, 1, H, W]
        x = np.repeat(images[part], len(ks), axis=0)
        b = np.repeat(baseline[part], len(ks), axis=0)
        for kind, batch in (("deletion", np.where(masks, b, x)), ("insertion", np.where(masks, x, b))):
            logits = session.run(["logits"], {"images": batch.astype(np.float32)})[0]
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            p = probs.reshape(-1, len(ks), probs.shape[1])
            out[kind][part] = np.take_along_axis(p, pred[part][:, None, None], axis=2)[..., 0]
    return ks / pixels, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=28, help="28 steps of 28 pixels on 28x28 images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import gradprobe
    from gradprobe.bench import _ort_session, logits_only_model
    from gradprobe.models import load_pretrained

    started = time.perf_counter()
    images, labels = gradprobe.data.fashion_mnist("test")
    images, labels = images[:args.count], labels[:args.count]
    work = Path(tempfile.mkdtemp(prefix="gradprobe-faithfulness-"))
    bundle = gradprobe.export(load_pretrained("resnet-fmnist"), images[:8], work / "bundle")
    probe = gradprobe.load(bundle, threads=args.threads, spinning=False)
    explanation = probe.explain(images)
    rng = np.random.default_rng(args.seed)
    maps = {"gradcam": explanation.cam, "contrastive": explanation.contrastive_cam,
            "counterfactual": explanation.counterfactual_cam,
            "random": rng.random(explanation.cam.shape, dtype=np.float32)}
    np.save(work / "images.npy", images)
    np.save(work / "contrast.npy", explanation.contrast)
    run_peers("maps", {**peer_spec(bundle, args.threads), "images": str(work / "images.npy"),
                       "contrast": str(work / "contrast.npy"), "out": str(work)}, work, args.threads)
    maps["pytorch-grad-cam"] = np.load(work / "gradcam_cam.npy")
    peer_difference = float(np.abs(maps["pytorch-grad-cam"] - explanation.cam).max())

    session = _ort_session(logits_only_model(bundle / "probe.onnx", work / "logits.onnx"), args.threads)
    rows, all_curves = [], {}
    for baseline_name, baseline in _baselines(images).items():
        for method, saliency in maps.items():
            fractions, result = curves(session, images, baseline, saliency, explanation.pred, args.steps,
                                       np.random.default_rng(args.seed + 1))
            aucs = {kind: np.trapezoid(result[kind], fractions, axis=1) for kind in result}
            row = {"baseline": baseline_name, "method": method, "images": len(images)}
            for kind, values in [*aucs.items(), ("insertion-deletion", aucs["insertion"] - aucs["deletion"])]:
                row[kind] = {"mean": float(values.mean()), "ci95": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))}
            rows.append(row)
            all_curves[f"{baseline_name}/{method}"] = {k: v.mean(0).round(5).tolist() for k, v in result.items()}
            print(f"{baseline_name:<6} {method:<17} deletion {row['deletion']['mean']:.4f} "
                  f"insertion {row['insertion']['mean']:.4f}", flush=True)

    empty = {kind: int(mask.sum()) for kind, mask in explanation.empty.items()}
    result = {"model": "resnet-fmnist (shipped, 92.36% test accuracy)", "images": f"Fashion-MNIST test[:{len(images)}]",
              "accuracy_on_these": float((explanation.pred == labels).mean()),
              "tracked": "p_P, P = prediction on the intact image", "steps": args.steps,
              "pixels_per_step": images[0, 0].size // args.steps, "methods": METHODS,
              "baselines": {"black": "removed pixel = 0 (the data set's black background)",
                            "blur": "removed pixel = Gaussian blur of the image, sigma 3 px (scipy.ndimage)"},
              "empty_maps": empty, "max_abs_ours_vs_pytorch_grad_cam": peer_difference,
              "rows": rows, "mean_curves": {"fractions": fractions.tolist(), **all_curves},
              "seconds": round(time.perf_counter() - started, 1)}
    write_results("faithfulness", result, table(result))


def table(result) -> str:
    lines = [f"# Faithfulness: deletion / insertion AUC, {result['images']}, shipped ResNet via ONNX Runtime", "",
             f"Tracked: {result['tracked']}; {result['steps']} steps of {result['pixels_per_step']} pixels, most "
             "salient first; ties broken at random. Deletion: lower is more faithful; insertion: higher is; "
             "mean ± 95% CI over images.", "",
             "| removed = | map | deletion AUC ↓ | insertion AUC ↑ | insertion − deletion ↑ |",
             "|---|---|---|---|---|"]
    for row in result["rows"]:
        cells = [f"{row[k]['mean']:.4f} ± {row[k]['ci95']:.4f}" for k in ("deletion", "insertion", "insertion-deletion")]
        lines.append(f"| {row['baseline']} | {result['methods'][row['method']]} | " + " | ".join(cells) + " |")
    lines += ["", *(f"- removed = {k}: {v}" for k, v in result["baselines"].items()),
              f"- maps that are all zero (ReLU removed everything; ordered at random): {result['empty_maps']} "
              f"of {result['images']}",
              f"- max |ours − pytorch_grad_cam.GradCAM| over all maps: {result['max_abs_ours_vs_pytorch_grad_cam']:.1e}",
              "- the counterfactual map shows evidence *against* P, so removing it first is not expected to lower p_P.",
              f"- wall time {result['seconds']} s", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
