"""Explanation latency, one run: ``Probe.explain`` (ONE ORT call, all three maps, upsampled + normalised) vs
pytorch-grad-cam ``GradCAM`` and Captum ``LayerGradCam`` (peers venv subprocess), batch 1 and 64, CPU.

Engines (every one returns [B, H, W] maps upsampled to the input and min-max normalised):
- ours: ``gradprobe.load(bundle, threads=T, spinning=False).explain(images)``: Grad-CAM, contrastive (runner-up
  Q) and counterfactual from one ORT call.
- gradcam.cam / captum.cam: the peer's Grad-CAM only (Captum needs P: a no-grad forward first).
- gradcam.all3 / captum.all3: the three maps the peer's way: a no-grad forward for P and Q, then one
  forward + backward per map kind (contrastive as target -log_softmax(z)[Q], counterfactual as target -z[P]).
Models: the shipped ResNet (quarter width) and the full-width CIFAR ResNet-18 layout (random weights; timing
only). torch.set_num_threads(T) in the peers; ORT intra-op threads T, spinning off. Ours is timed before and
after the peers (drift check); ratios = peer median / ours median.

    .venv/bin/python benchmarks/explain_speed.py [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from explain_common import peer_spec, run_peers, write_results

ROUNDS = {"resnet-fmnist": {1: 40, 64: 20}, "resnet18": {1: 10, 64: 5}}
PEERS = ("gradcam.cam", "gradcam.all3", "captum.cam", "captum.all3")
TARGET = ("resnet-fmnist", 64, "gradcam.cam", 4.0)  # model, batch, peer, ratio >=


def _time(call, rounds, warmup=2):
    for _ in range(warmup):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _stats(seconds) -> dict:
    seconds = np.asarray(seconds)
    return {"median_ms": float(np.median(seconds) * 1e3), "p90_ms": float(np.percentile(seconds, 90) * 1e3),
            "rounds": int(len(seconds))}


def _bundles(work: Path, example, names):
    import torch

    import gradprobe
    from gradprobe.models import build_model, load_pretrained

    if "resnet-fmnist" in names:
        yield "resnet-fmnist", gradprobe.export(load_pretrained("resnet-fmnist"), example, work / "resnet-fmnist")
    if "resnet18" in names:
        torch.manual_seed(0)
        yield "resnet18", gradprobe.export(build_model("resnet18").eval(), example, work / "resnet18")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="resnet-fmnist,resnet18")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds per batch (smoke runs)")
    parser.add_argument("--out", default="explain_speed", help="results name under benchmarks/results")
    args = parser.parse_args(argv)
    rounds = {m: {b: args.rounds or r for b, r in per.items()} for m, per in ROUNDS.items()}

    import gradprobe
    from gradprobe.bench import _environment, busy_cores

    images, _ = gradprobe.data.fashion_mnist("test")
    work = Path(tempfile.mkdtemp(prefix="gradprobe-explain-speed-"))
    rows, drift, peer_versions = [], {}, {}
    busy_before = busy_cores()
    for model, bundle in _bundles(work, images[:8], args.models.split(",")):
        probe = gradprobe.load(bundle, threads=args.threads, spinning=False)
        batches = {b: np.ascontiguousarray(images[:b]) for b in rounds[model]}
        before = {b: _time(lambda x=x: probe.explain(x), rounds[model][b]) for b, x in batches.items()}
        spec = {**peer_spec(bundle, args.threads), "warmup": 2, "batches": []}
        for b, x in batches.items():
            np.save(work / f"{model}-{b}.npy", x)
            spec["batches"].append({"batch": b, "images": str(work / f"{model}-{b}.npy"), "rounds": rounds[model][b]})
        peers = run_peers("time", spec, work, args.threads)
        peer_versions = {k: peers[k] for k in ("torch", "grad_cam", "captum", "threads")}
        after = {b: _time(lambda x=x: probe.explain(x), rounds[model][b]) for b, x in batches.items()}
        for b in batches:
            ours = _stats(before[b] + after[b])
            drift[f"{model}/{b}"] = float(np.median(after[b]) / np.median(before[b]))
            rows.append({"model": model, "batch": b, "engine": "ours", **ours})
            for peer in PEERS:
                stats = _stats(peers["batches"][str(b)][peer])
                rows.append({"model": model, "batch": b, "engine": peer, **stats,
                             "ratio_to_ours": stats["median_ms"] / ours["median_ms"]})
            print(f"{model} batch {b}: " + ", ".join(f"{r['engine']} {r['median_ms']:.1f} ms" for r in rows
                                                     if r["model"] == model and r["batch"] == b), flush=True)

    model, batch, peer, bound = TARGET
    value = next(r["ratio_to_ours"] for r in rows if (r["model"], r["batch"], r["engine"]) == (model, batch, peer))
    result = {"environment": {**_environment(args.threads), "peers": peer_versions, "busy_cores_before": busy_before,
                              "busy_cores_after": busy_cores()},
              "models": {"resnet-fmnist": "shipped checkpoint, CIFAR ResNet-18 layout at quarter width (0.70 M params)",
                         "resnet18": "full-width CIFAR ResNet-18 layout, random weights (timing only)"},
              "inputs": "Fashion-MNIST test[:B], 1x28x28", "engines": __doc__.split("Engines")[1].split("Models:")[0],
              "rows": rows, "drift_ours_after_over_before": drift,
              "target": {"model": model, "batch": batch, "peer": peer, "bound": bound, "ratio": value,
                         "holds": value >= bound}}
    write_results(args.out, result, table(result))


def table(result) -> str:
    env = result["environment"]
    lines = ["# Explanation latency on CPU (medians of one run; ratio = peer median / ours median)", "",
             f"{env['threads']} threads everywhere (ORT spinning off); onnxruntime {env['onnxruntime']}; peers: torch "
             f"{env['peers'].get('torch')}, grad-cam {env['peers'].get('grad_cam')}, captum {env['peers'].get('captum')}; "
             f"{env['cpu_count']} CPU cores, busy cores before/after: {env['busy_cores_before']}/{env['busy_cores_after']}"
             " (other work on a shared machine inflates and scatters every number: rerun on a quiet machine).", "",
             "| model | batch | engine | maps | median ms | p90 ms | rounds | peer / ours |", "|---|---|---|---|---|---|---|---|"]
    maps = {"ours": "all 3, one ORT call", "gradcam.cam": "Grad-CAM", "gradcam.all3": "all 3 (forward + 3 calls)",
            "captum.cam": "Grad-CAM (+ forward for P)", "captum.all3": "all 3 (forward + 3 calls)"}
    for r in result["rows"]:
        ratio = f"{r['ratio_to_ours']:.1f}×" if "ratio_to_ours" in r else "—"
        lines.append(f"| {r['model']} | {r['batch']} | {r['engine']} | {maps[r['engine']]} | {r['median_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['rounds']} | {ratio} |")
    t = result["target"]
    lines += ["", f"Target: {t['peer']} / ours at batch {t['batch']} on {t['model']} ≥ {t['bound']}×: "
              f"**{t['ratio']:.1f}× — {'holds' if t['holds'] else 'does NOT hold'}**.",
              f"Drift of ours (median after the peers / before): "
              + ", ".join(f"{k} {v:.2f}" for k, v in result["drift_ours_after_over_before"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
