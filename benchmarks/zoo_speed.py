"""Cost of the probe graph on real torchvision models, batch 32 at 224x224 (issue 8 targets).

Per model, in one process, interleaved in blocks so that load on the machine hits every engine alike:
- (a) ONNX Runtime, the model's plain forward (``torch.onnx.export`` of the model: logits only);
- (b) ONNX Runtime, the probe graph with every last-layer output and the four maps;
- (c) the probe graph with ``layer_grads=True`` through the runtime engine (taps completed by the numpy
  kernels), beside (d) eager ``torch.func.vmap(grad)`` of the same per-sample norms;
and, with ``--generic``, the ``layer_grads`` graph built with the generic rule only (``hand_rules=False``)
to measure what the hand rules buy. ONNX Runtime: intra-op threads pinned (``--threads``), spinning off,
sequential execution; torch: the same thread count. Writes ``benchmarks/results/zoo_speed.{json,md}``.

    .venv-peers/bin/python -m benchmarks.zoo_speed export   # bundles under .cache/zoo-speed (slow, once)
    .venv-peers/bin/python -m benchmarks.zoo_speed time     # the timings, one run
Timing, summaries and result files: ``benchmarks/harness``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .harness import timing

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "zoo-speed"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny", "densenet121")
GENERIC_MODELS = ("resnet50", "mobilenet_v3_large")
BATCH, SIZE = 32, 224



def _model(name: str):
    from .zoo import nontrivial_statistics

    import torch
    import torchvision.models

    torch.manual_seed(0)
    return nontrivial_statistics(torchvision.models.get_model(name, weights=None, num_classes=1000), SIZE)


def export(names, generic: bool, jobs=("plain.onnx", "maps", "layer_grads")) -> None:
    import torch

    import gradprobe

    torch.set_num_threads(int(os.environ.get("ZOO_SPEED_EXPORT_THREADS", 2)))
    example = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    for name in names:
        folder = CACHE / name
        folder.mkdir(parents=True, exist_ok=True)
        model = _model(name)
        kinds = [("plain.onnx", None), ("maps", {}), ("layer_grads", {"layer_grads": True})]
        if generic and name in GENERIC_MODELS:
            kinds.append(("layer_grads_generic", {"layer_grads": True, "hand_rules": False}))
        for target, options in kinds:
            if target not in jobs and target != "layer_grads_generic":
                continue
            path = folder / target
            if path.exists():
                continue
            started = time.perf_counter()
            if options is None:
                batch = torch.export.Dim("batch", min=1, max=1024)
                torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                                  output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False)
            else:
                gradprobe.export(model, example, path, **options)
            print(f"{name} {target}: exported in {time.perf_counter() - started:.0f} s", flush=True)


def _session(path: Path, threads: int):
    from gradprobe.runtime import create_backend

    return create_backend("onnxruntime", path.read_bytes(), threads=threads, spinning=False)


def _engine(bundle: Path, threads: int):
    from gradprobe.base.bundle import Bundle
    from gradprobe.runtime import ProbeEngine, create_backend

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    graph = opened.read(manifest.graph)
    backend = create_backend("onnxruntime", graph, threads=threads, spinning=False)
    return ProbeEngine(backend, manifest, max_batch=BATCH)


def time_model(name: str, threads: int, blocks: int, vmap_runs: int) -> dict:
    """(a), (b), (c) [and the generic-only (c)] and (d) vmap(grad), interleaved by the harness in one run."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    folder = CACHE / name
    images = np.random.default_rng(0).random((BATCH, 3, SIZE, SIZE), dtype=np.float32)
    contrast = np.full(BATCH, -1, dtype=np.int64)
    plain = _session(folder / "plain.onnx", threads)
    engines = {"b": _engine(folder / "maps", threads), "c": _engine(folder / "layer_grads", threads)}
    if (folder / "layer_grads_generic").exists():
        engines["c_generic"] = _engine(folder / "layer_grads_generic", threads)
    runs = {"a": lambda _: plain.infer({"images": images})}
    for key, engine in engines.items():
        runs[key] = (lambda e: lambda _: e.infer(images, {"contrast": contrast}, validated=True))(engine)
    runs["vmap"] = _vmap_engine(name, images)
    policies = {key: timing.RoundsPolicy(budget_s=0.0, min_rounds=1, max_rounds=1) for key in runs}
    rounds = {**{key: blocks for key in runs}, "vmap": vmap_runs}
    seconds = timing.time_interleaved(runs, None, policies, rounds)
    result = {key: timing.summarize(values) for key, values in seconds.items()}
    medians = {key: value["median_ms"] for key, value in result.items()}
    result["ratio_b_a"] = medians["b"] / medians["a"]
    result["ratio_c_a"] = medians["c"] / medians["a"]
    if "c_generic" in medians:
        result["ratio_c_generic_c"] = medians["c_generic"] / medians["c"]
    result["ratio_vmap_c"] = medians["vmap"] / medians["c"]
    return result


def _vmap_engine(name: str, images):
    """(d): eager per-sample gradient norms of every parameter tensor, torch.func.vmap(grad) of the all-ones BCE."""
    import torch
    from torch.func import functional_call, grad, vmap

    model = _model(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def confounding(params, sample):
        z = functional_call(model, (params, buffers), (sample[None],))
        return torch.nn.functional.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="sum")

    x = torch.from_numpy(images)
    chunk = 8  # B x P per-sample gradients at once would not fit in memory for the larger models

    def run(_):
        norms = []
        for start in range(0, len(x), chunk):
            per_sample = vmap(grad(confounding), in_dims=(None, 0))(params, x[start:start + chunk])
            norms.append(torch.stack([g.pow(2).flatten(1).sum(1) for g in per_sample.values()], 1))
        return torch.cat(norms)

    return run


def time_models(names, threads: int, blocks: int, vmap_runs: int) -> None:
    out = RESULTS / "zoo_speed.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["_environment"] = timing.environment(threads, batch=BATCH, size=SIZE,
                                                 load_average_at_start=os.getloadavg())
    for name in names:
        started = time.perf_counter()
        results[name] = time_model(name, threads, blocks, vmap_runs)
        print(f"{name}: b/a {results[name]['ratio_b_a']:.3f}, c/a {results[name]['ratio_c_a']:.2f}, "
              f"vmap/c {results[name]['ratio_vmap_c']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
        timing.write_results("zoo_speed", table(results), results)
    results["_environment"]["load_average_at_end"] = os.getloadavg()
    timing.publish("zoo_speed", table(results), results)


def table(results: dict) -> str:
    env = results["_environment"]
    lines = ["# Probe graph cost on torchvision models (batch 32, 224x224)", "",
             f"`python -m benchmarks.zoo_speed time`, one run per model with the engines interleaved by the harness; "
             f"ONNX Runtime "
             f"{env['onnxruntime']} with {env['threads']} intra-op threads, spinning off; torch {env['torch']} with "
             f"{env['threads']} threads. Load average {env['load_average_at_start']} at start: the machine is "
             "shared, so absolute times are noisy; the ratios are of medians measured side by side.", "",
             "| model | (a) ORT forward median ms | (b) probe, last layer + maps median ms | **(b)/(a)** | (c) layer_grads "
             "median ms | (c)/(a) | (d) vmap(grad) median ms | (d)/(c) | generic-only (c)/(c) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        generic = f"{row['ratio_c_generic_c']:.2f}" if "ratio_c_generic_c" in row else "—"
        lines.append(f"| {name} | {row['a']['median_ms']:.0f} | {row['b']['median_ms']:.0f} | **{row['ratio_b_a']:.3f}** | "
                     f"{row['c']['median_ms']:.0f} | {row['ratio_c_a']:.2f} | {row['vmap']['median_ms']:.0f} | "
                     f"{row['ratio_vmap_c']:.2f} | {generic} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("export", "time", "table"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--generic", action="store_true", help="also the generic-only layer_grads graphs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["plain.onnx", "maps", "layer_grads"],
                        help="export: which of plain.onnx, maps, layer_grads (e.g. every model's maps first)")
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--vmap-runs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.models, args.generic, args.only)
    elif args.command == "time":
        time_models(args.models, args.threads, args.blocks, args.vmap_runs)
    else:
        timing.write_results("zoo_speed", table(json.loads((RESULTS / "zoo_speed.json").read_text())))


if __name__ == "__main__":
    main()
