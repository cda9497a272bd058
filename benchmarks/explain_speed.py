"""Explanation latency in one run: ``Probe.explain`` (ONE engine call, every map, upsampled + normalised) vs
pytorch-grad-cam and Captum (peers venv), batch 1 and 64, CPU.

Engines (every one returns [B, H, W] maps upsampled to the input and min-max normalised):
- ours: ``gradprobe.load(bundle, threads=T, spinning=False).explain(images)``: Grad-CAM, contrastive (runner-up
  Q), counterfactual and Grad-CAM++ from one call of the probe graph.
- gradcam.cam / captum.cam: the peer's Grad-CAM only (Captum needs P: a no-grad forward first).
- gradcam.pp: pytorch-grad-cam's ``GradCAMPlusPlus`` only.
- gradcam.all3 / captum.all3: Grad-CAM, contrastive and counterfactual the peer's way: a no-grad forward for P and
  Q, then one forward + backward per map (contrastive as target -log_softmax(z)[Q], counterfactual as -z[P]).
Models: the shipped ResNet (quarter width) and the full-width CIFAR ResNet-18 layout (random weights; timing
only). torch.set_num_threads(T) in the peers; ORT intra-op threads T, spinning off. Ours is timed before and
after the peers (drift check); ratios = peer median / ours median.

    python -m benchmarks.cli eval explain-speed [--threads 2]      (or: gradprobe eval explain-speed)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .harness import peers, timing

ROUNDS = {"resnet-fmnist": {1: 40, 64: 20}, "resnet18": {1: 10, 64: 5}}
WARMUP = timing.RoundsPolicy(budget_s=0.0, min_rounds=1, max_rounds=1, warmup=2)  # rounds are always fixed here
TARGET = timing.Target("gradcam.cam / ours", ">=", 4.0, {"model": "resnet-fmnist", "batch": 64})
MAPS = {"ours": "all maps, one engine call", "gradcam.cam": "Grad-CAM", "gradcam.pp": "Grad-CAM++",
        "gradcam.all3": "3 maps (forward + 3 calls)", "captum.cam": "Grad-CAM (+ forward for P)",
        "captum.all3": "3 maps (forward + 3 calls)"}


def _bundles(work: Path, example, names):
    import torch

    import gradprobe
    from gradprobe.models import build_model, load_pretrained

    if "resnet-fmnist" in names:
        yield "resnet-fmnist", gradprobe.export(load_pretrained("resnet-fmnist"), example, work / "resnet-fmnist")
    if "resnet18" in names:
        torch.manual_seed(0)
        yield "resnet18", gradprobe.export(build_model("resnet18").eval(), example, work / "resnet18")


def _time_ours(probe, images: np.ndarray, rounds: int) -> list[float]:
    return timing.time_interleaved({"ours": probe.explain}, images, {"ours": WARMUP}, {"ours": rounds})["ours"]


def measure(threads: int, models: list[str], rounds_override: int | None) -> dict:
    import gradprobe

    rounds = {m: {b: rounds_override or r for b, r in per.items()} for m, per in ROUNDS.items()}
    images, _ = gradprobe.data.fashion_mnist("test")
    rows, drift, peer_info = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="gradprobe-explain-speed-") as folder, timing.load_watch() as load:
        work = Path(folder)
        for model, bundle in _bundles(work, images[:8], models):
            probe = gradprobe.load(bundle, threads=threads, spinning=False)
            batches = {b: np.ascontiguousarray(images[:b]) for b in rounds[model]}
            before = {b: _time_ours(probe, x, rounds[model][b]) for b, x in batches.items()}
            spec = {**peers.model_spec(bundle, threads), "policy": vars(WARMUP), "batches": []}
            for b, x in batches.items():
                np.save(work / f"{model}-{b}.npy", x)
                spec["batches"].append({"batch": b, "images": str(work / f"{model}-{b}.npy"), "rounds": rounds[model][b]})
            result = peers.run_peer("explain_peers.py", spec, "time", threads=threads)
            peer_info = {k: v for k, v in result.items() if k != "batches"}
            after = {b: _time_ours(probe, x, rounds[model][b]) for b, x in batches.items()}
            for b in batches:
                drift[f"{model}/{b}"] = float(np.median(after[b]) / np.median(before[b]))
                rows.append({"model": model, "batch": b, "engine": "ours", **timing.summarize(before[b] + after[b])})
                for peer, seconds in result["batches"][str(b)].items():
                    rows.append({"model": model, "batch": b, "engine": peer, **timing.summarize(seconds)})
                print(f"{model} batch {b}: " + ", ".join(f"{r['engine']} {r['median_ms']:.1f} ms" for r in rows
                                                         if r["model"] == model and r["batch"] == b), flush=True)
    engines = sorted({r["engine"] for r in rows} - {"ours"}, key=list(MAPS).index)
    ratios = timing.compose_ratios(rows, [(f"{e} / ours", e, "ours") for e in engines], group=("model", "batch"))
    by_place = {(e["model"], e["batch"]): e for e in ratios}
    for r in rows:
        if r["engine"] != "ours":
            r["ratio_to_ours"] = by_place[(r["model"], r["batch"])][f"{r['engine']} / ours"]
    return {"environment": {**timing.environment(threads), **load, "peers": peer_info},
            "models": {"resnet-fmnist": "shipped checkpoint, CIFAR ResNet-18 layout at quarter width (0.70 M params)",
                       "resnet18": "full-width CIFAR ResNet-18 layout, random weights (timing only)"},
            "inputs": "Fashion-MNIST test[:B], 1x28x28", "engines": __doc__.split("Engines")[1].split("Models:")[0],
            "rows": rows, "ratios": ratios, "drift_ours_after_over_before": drift,
            "targets": timing.check_targets([TARGET], ratios)}


def table(result) -> str:
    env = result["environment"]
    lines = ["# Explanation latency on CPU (medians of one run; ratio = peer median / ours median)", "",
             f"{env['threads']} threads everywhere (ORT spinning off); onnxruntime {env['onnxruntime']}; peers: torch "
             f"{env['peers'].get('torch')}, grad-cam {env['peers'].get('grad-cam')}, captum {env['peers'].get('captum')}; "
             f"{env['cpu_count']} CPU cores.", "",
             "| model | batch | engine | maps | median ms | p90 ms | rounds | peer / ours |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ratio = f"{r['ratio_to_ours']:.1f}×" if r.get("ratio_to_ours") else "—"
        lines.append(f"| {r['model']} | {r['batch']} | {r['engine']} | {MAPS[r['engine']]} | {r['median_ms']:.2f} | "
                     f"{r['p90_ms']:.2f} | {r['n']} | {ratio} |")
    lines += ["", *timing.target_lines(result["targets"]),
              "- drift of ours (median after the peers / before): "
              + ", ".join(f"{k} {v:.2f}" for k, v in result["drift_ours_after_over_before"].items()),
              *timing.load_lines(env), *(f"- {name} skipped: {why}" for name, why in env["peers"].get("skipped", {}).items())]
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="resnet-fmnist,resnet18", help="comma-separated: resnet-fmnist,resnet18")
    parser.add_argument("--rounds", type=int, default=None, help="override the rounds per batch (smoke runs)")
    timing.add_output_arguments(parser, "explain_speed")


def run(args) -> int:
    result = measure(args.threads, args.models.split(","), args.rounds)
    timing.publish(args.name, table(result), result, args.out)
    return 0


EVALUATIONS = {"explain-speed": ("explanation latency: Probe.explain vs pytorch-grad-cam and Captum (peers venv)",
                                  add_arguments, run)}
