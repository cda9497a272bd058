"""Deletion and insertion AUC of the explanation maps (Petsiuk et al., RISE, BMVC 2018), shipped ResNet.

Deletion: remove the most salient pixels first, STEP pixels at a time, and track p_P (P = the class predicted
on the intact image); a faithful map makes p_P fall fast (low AUC). Insertion: start from the fully removed
image and add the most salient pixels first (high AUC). "Removed" is a baseline value per pixel: ``black`` (0,
the Fashion-MNIST background) and ``blur`` (Gaussian, sigma 3 px). Ties in a map (e.g. zeros after the ReLU)
are broken at random, so an empty map behaves like the random map. AUC: numpy.trapezoid over the fraction of
pixels in [0, 1]. Every map of the bundle is scored (its manifest lists them), beside a random map and, when
the peers venv exists, pytorch-grad-cam's GradCAM and GradCAMPlusPlus; every probability comes from the
bundle's logits subgraph run by the ONNX Runtime backend.

    python -m benchmarks.cli eval faithfulness [--count 1000] [--threads 2]   (or: gradprobe eval faithfulness)
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import peers, timing
from .latency import logits_only_graph, ort_backend

#: Peer maps scored beside ours: method name -> (file written by explain_peers.py, our map it reproduces).
PEER_MAPS = {"pytorch-grad-cam": ("gradcam_cam", "cam"), "pytorch-grad-cam++": ("gradcam_gradcam_pp", "gradcam_pp")}
PEER_LABELS = {"pytorch-grad-cam": "pytorch_grad_cam.GradCAM (peers venv)",
               "pytorch-grad-cam++": "pytorch_grad_cam.GradCAMPlusPlus (peers venv)"}


def _baselines(images):
    from scipy.ndimage import gaussian_filter

    return {"black": np.zeros_like(images), "blur": gaussian_filter(images, sigma=(0, 0, 3, 3)).astype(np.float32)}


def curves(backend, images, baseline, saliency, pred, steps, rng, chunk=32):
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
            logits = backend.infer({"images": batch.astype(np.float32)})["logits"]
            probs = np.exp(logits - logits.max(1, keepdims=True))
            probs /= probs.sum(1, keepdims=True)
            p = probs.reshape(-1, len(ks), probs.shape[1])
            out[kind][part] = np.take_along_axis(p, pred[part][:, None, None], axis=2)[..., 0]
    return ks / pixels, out


def _peer_maps(bundle, images, contrast, work: Path, threads: int) -> tuple[dict, list[str]]:
    np.save(work / "images.npy", images)
    np.save(work / "contrast.npy", contrast)
    try:
        spec = {**peers.model_spec(bundle, threads), "images": str(work / "images.npy"),
                "contrast": str(work / "contrast.npy"), "out": str(work / "peers")}
        peers.run_peer("explain_peers.py", spec, "maps", threads=threads)
    except peers.PeersUnavailable as error:
        return {}, [f"peer maps skipped: {error}"]
    return {method: np.load(work / "peers" / f"{stem}.npy") for method, (stem, _) in PEER_MAPS.items()}, []


def measure(count: int, steps: int, threads: int, seed: int) -> dict:
    import gradprobe
    from gradprobe.base.bundle import Bundle
    from gradprobe.models import load_pretrained

    started = time.perf_counter()
    images, labels = gradprobe.data.fashion_mnist("test")
    images, labels = images[:count], labels[:count]
    with tempfile.TemporaryDirectory(prefix="gradprobe-faithfulness-") as folder, timing.load_watch() as load:
        work = Path(folder)
        bundle = gradprobe.export(load_pretrained("resnet-fmnist"), images[:8], work / "bundle")
        probe = gradprobe.load(bundle, threads=threads, spinning=False)
        explanation = probe.explain(images)
        methods = {spec.name: f"{spec.name} (ours): {spec.question.format(P='P', Q='Q').replace(chr(10), ' ')}"
                   for spec in probe.manifest.classifier.maps}
        maps = dict(explanation.maps)
        rng = np.random.default_rng(seed)
        maps["random"], methods["random"] = rng.random(explanation.cam.shape, dtype=np.float32), "random map (uniform noise)"
        peer_maps, skipped = _peer_maps(bundle, images, explanation.contrast, work, threads)
        differences = {method: float(np.abs(peer - maps[PEER_MAPS[method][1]]).max()) for method, peer in peer_maps.items()}
        maps.update(peer_maps)
        methods.update({method: PEER_LABELS[method] for method in peer_maps})
        opened = Bundle.open(bundle)
        backend = ort_backend(logits_only_graph(opened.read(opened.manifest.graph)), threads)
        rows, all_curves = [], {}
        for baseline_name, baseline in _baselines(images).items():
            for method, saliency in maps.items():
                fractions, result = curves(backend, images, baseline, saliency, explanation.pred, steps,
                                           np.random.default_rng(seed + 1))
                aucs = {kind: np.trapezoid(result[kind], fractions, axis=1) for kind in result}
                row = {"baseline": baseline_name, "method": method, "images": len(images)}
                for kind, values in [*aucs.items(), ("insertion-deletion", aucs["insertion"] - aucs["deletion"])]:
                    row[kind] = {"mean": float(values.mean()), "ci95": float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))}
                rows.append(row)
                all_curves[f"{baseline_name}/{method}"] = {k: v.mean(0).round(5).tolist() for k, v in result.items()}
                print(f"{baseline_name:<6} {method:<20} deletion {row['deletion']['mean']:.4f} "
                      f"insertion {row['insertion']['mean']:.4f}", flush=True)
    return {"model": "resnet-fmnist (shipped)", "images": f"Fashion-MNIST test[:{len(images)}]",
            "accuracy_on_these": float((explanation.pred == labels).mean()),
            "tracked": "p_P, P = prediction on the intact image", "steps": steps,
            "pixels_per_step": images[0, 0].size // steps, "methods": methods,
            "baselines": {"black": "removed pixel = 0 (the data set's black background)",
                          "blur": "removed pixel = Gaussian blur of the image, sigma 3 px (scipy.ndimage)"},
            "empty_maps": {kind: int(mask.sum()) for kind, mask in explanation.empty.items()},
            "max_abs_ours_vs_peer": differences, "skipped": skipped,
            "rows": rows, "mean_curves": {"fractions": fractions.tolist(), **all_curves},
            "environment": {**timing.environment(threads), **load}, "seconds": round(time.perf_counter() - started, 1)}


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
              *(f"- max |ours − {method}| over all maps: {value:.1e}" for method, value in result["max_abs_ours_vs_peer"].items()),
              "- the counterfactual map shows evidence *against* P, so removing it first is not expected to lower p_P.",
              *(f"- {reason}" for reason in result["skipped"]), f"- wall time {result['seconds']} s"]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=28, help="28 steps of 28 pixels on 28x28 images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    timing.add_output_arguments(parser, "faithfulness")


def run(args) -> int:
    result = measure(args.count, args.steps, args.threads, args.seed)
    timing.publish(args.name, table(result), result, args.out)
    return 0


EVALUATIONS = {"faithfulness": ("deletion / insertion AUC of every explanation map, beside pytorch-grad-cam's",
                                add_arguments, run)}
