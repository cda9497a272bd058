"""Per-layer confounding-gradient norms on CPU: the probe graph against vmap(grad) and the per-sample loop.

Side by side in one run, same model and batch, interleaved round-robin (``harness.timing``):
  forward      ONNX Runtime backend, logits only (the probe graph's forward, extracted)
  layer_grads  the probe graph with layer_grad_sqnorm (``Probe.run``: the runtime engine + norm kernels)
  vmap         torch.func.vmap(grad) per-sample gradients, then their squared norms
  loop         the research reference: per sample, forward + backward, read every .grad
Then, each in its own subprocess, the peak memory (VmHWM growth) of the probe graph and of vmap(grad)
on the ResNet-18 CIFAR layout (3x32x32) at batch 256.

    python -m benchmarks.cli eval layer-grads [--batch 64] [--rounds 5] [--skip-memory]
Writes benchmarks/results/layer_grads.{json,md}.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .harness import timing
from .harness.peers import CHECKOUT
from .latency import logits_only_graph, ort_backend

PAIRS = [("layer_grads / forward", "layer_grads", "forward"), ("loop / layer_grads", "loop", "layer_grads"),
         ("vmap / layer_grads", "vmap", "layer_grads")]
TARGETS = [timing.Target("layer_grads / forward", "<=", 3.0), timing.Target("loop / layer_grads", ">=", 3.0),
           timing.Target("vmap / layer_grads", ">", 1.0)]


def _confounding(z):
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="sum")


def torch_engines(model, mean, std):
    """(vmap_norms, loop_norms): images -> [B, P] per-sample squared norms of every parameter tensor."""
    import torch
    from torch.func import functional_call, grad, vmap

    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def per_sample_loss(p, sample):
        return _confounding(functional_call(model, (p, buffers), (sample[None],)))

    def vmap_norms(images):
        with torch.no_grad():
            x = (torch.from_numpy(images) - mean) / std
        per_sample = vmap(grad(per_sample_loss), in_dims=(None, 0))(params, x)
        return torch.stack([g.pow(2).flatten(1).sum(1) for g in per_sample.values()], 1)

    def loop_norms(images):
        x = (torch.from_numpy(images) - mean) / std
        rows = []
        for index in range(len(x)):
            model.zero_grad(set_to_none=True)
            _confounding(model(x[index:index + 1])).backward()
            rows.append(torch.stack([p.grad.pow(2).sum() for p in model.parameters()]))
        return torch.stack(rows)

    return vmap_norms, loop_norms


def measure_latency(model, bundle: Path, batch: int, rounds: int, threads: int) -> dict:
    import torch

    import gradprobe
    from gradprobe.base.bundle import Bundle

    torch.set_num_threads(threads)
    probe = gradprobe.load(bundle, threads=threads, spinning=False)
    opened = Bundle.open(bundle)
    forward = ort_backend(logits_only_graph(opened.read(opened.manifest.graph)), threads)
    vmap_norms, loop_norms = torch_engines(model, probe.manifest.input.mean, probe.manifest.input.std)
    images = np.random.default_rng(0).random((batch, *probe.input_shape), dtype=np.float32)
    ours = probe.run(images).layer_grad_sqnorm
    check = vmap_norms(images).double().numpy()
    agreement = float(np.max(np.abs(ours - check) / np.maximum(np.abs(check), 0.1)))
    engines = {"forward": lambda x: forward.infer({"images": x}), "layer_grads": probe.run,
               "vmap": vmap_norms, "loop": loop_norms}
    policy = timing.RoundsPolicy(budget_s=0.0, min_rounds=rounds, max_rounds=rounds, warmup=1)
    times = timing.time_interleaved(engines, images, {name: policy for name in engines})
    rows = [{"engine": name, "batch": batch, **timing.summarize(seconds)} for name, seconds in times.items()]
    (ratios,) = timing.compose_ratios(rows, PAIRS)
    layer_grads = probe.manifest.classifier.layer_grads
    return {"batch": batch, "threads": threads, "rounds": rounds, "parameters": len(layer_grads.names),
            "forms": {f: layer_grads.forms.count(f) for f in ("closed", "gram", "tap")},
            "median_ms": {r["engine"]: r["median_ms"] for r in rows}, "p90_ms": {r["engine"]: r["p90_ms"] for r in rows},
            "ratios": {k: v for k, v in ratios.items() if k != "batch"}, "max_error_vs_vmap": agreement,
            "targets": timing.check_targets(TARGETS, [ratios])}


def _memory_child(engine: str, bundle: str, batch: int) -> None:
    """Runs in a subprocess: print the growth of peak RSS (MiB) caused by one call of ``engine``."""
    import torch

    import gradprobe
    from gradprobe.base.bundle import Bundle

    torch.set_num_threads(2)
    images = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    if engine == "probe":
        probe = gradprobe.load(bundle, threads=2, max_batch=batch)
        probe.run(images[:2])
        call = lambda: probe.run(images)  # noqa: E731
    else:
        opened = Bundle.open(bundle)
        model = gradprobe.models.load_checkpoint(opened.read(opened.manifest.model.weights))
        vmap_norms, _ = torch_engines(model, (0.0,), (1.0,))
        vmap_norms(images[:2])
        call = lambda: vmap_norms(images)  # noqa: E731
    before = _high_water_mib()
    call()
    after = _high_water_mib()
    print(json.dumps({"engine": engine, "peak_growth_mib": after - before, "peak_rss_mib": after}))


def _high_water_mib() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux carries the forking parent's high-water mark over exec."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure_memory(bundle: Path, batch: int) -> dict:
    result = {}
    for engine in ("probe", "vmap"):
        done = subprocess.run([sys.executable, "-m", "benchmarks.cli", "eval", "layer-grads", "--memory-child", engine,
                               str(bundle), str(batch)], capture_output=True, text=True, cwd=CHECKOUT)
        if done.returncode != 0:
            result[engine] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr else f"exit {done.returncode}"}
        else:
            result[engine] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(latency: dict, memory: dict | None, model_name: str) -> str:
    lines = [f"## {model_name}: per-sample norms of all {latency['parameters']} parameter tensors, batch "
             f"{latency['batch']}, {latency['threads']} threads, {latency['rounds']} interleaved rounds",
             f"forms: {latency['forms']}; probe graph vs vmap(grad): max error {latency['max_error_vs_vmap']:.1e}", "",
             "| engine | median ms | p90 ms |", "|---|---|---|"]
    for name, ms in latency["median_ms"].items():
        lines.append(f"| {name} | {ms:.1f} | {latency['p90_ms'][name]:.1f} |")
    lines += ["", "| ratio | measured | target | holds |", "|---|---|---|---|"]
    for target in latency["targets"]:
        lines.append(f"| {target['ratio']} | {target['value']:.2f} | {target['comparison']} {target['bound']} | "
                     f"{'yes' if target['holds'] else 'NO'} |")
    if memory:
        lines += ["", f"Peak memory, ResNet-18 CIFAR layout (3x32x32), batch {memory['batch']}, each engine in its "
                      "own process (VmHWM: growth during one call after a warm-up at batch 2, and the process total):",
                  "", "| engine | peak growth MiB | process peak MiB |", "|---|---|---|"]
        for engine in ("probe", "vmap"):
            entry = memory[engine]
            label = "probe graph + kernels" if engine == "probe" else "torch.func vmap(grad)"
            if "peak_growth_mib" in entry:
                lines.append(f"| {label} | {entry['peak_growth_mib']:.0f} | {entry['peak_rss_mib']:.0f} |")
            else:
                lines.append(f"| {label} | {entry['error']} | |")
    return "\n".join(lines)


def measure(batch: int, rounds: int, threads: int, memory_batch: int | None) -> tuple[dict, list[str]]:
    import torch

    import gradprobe

    fmnist = gradprobe.data.fashion_mnist("test")[0][:8]
    report, sections = {}, []
    with tempfile.TemporaryDirectory() as folder, timing.load_watch() as load:
        model = gradprobe.models.load_pretrained("resnet-fmnist")
        bundle = gradprobe.export(model, fmnist, Path(folder) / "shipped" / "bundle", layer_grads=True)
        report["shipped_resnet"] = measure_latency(model, bundle, batch, rounds, threads)
        sections.append(table(report["shipped_resnet"], None, "Shipped ResNet (quarter-width ResNet-18, 1x28x28)"))
        print(sections[-1], flush=True)
        torch.manual_seed(0)
        big = gradprobe.models.build_model("resnet18", in_channels=3).eval()
        big_bundle = gradprobe.export(big, np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32),
                                      Path(folder) / "resnet18" / "bundle", layer_grads=True)
        report["resnet18_cifar"] = measure_latency(big, big_bundle, batch, max(2, rounds // 2), threads)
        memory = None
        if memory_batch:
            memory = {"batch": memory_batch, **measure_memory(big_bundle, memory_batch)}
            report["memory"] = memory
        sections.append(table(report["resnet18_cifar"], memory, "ResNet-18 CIFAR layout (3x32x32, random weights)"))
        print(sections[-1], flush=True)
    report["environment"] = {**timing.environment(threads), **load}
    sections.append("\n".join(timing.load_lines(report["environment"])))
    return report, sections


def add_arguments(parser) -> None:
    import argparse

    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--skip-memory", action="store_true")
    timing.add_output_arguments(parser, "layer_grads")
    parser.add_argument("--memory-child", nargs=3, metavar=("ENGINE", "BUNDLE", "BATCH"), help=argparse.SUPPRESS)


def run(args) -> int:
    if args.memory_child:
        _memory_child(args.memory_child[0], args.memory_child[1], int(args.memory_child[2]))
        return 0
    report, sections = measure(args.batch, args.rounds, args.threads, None if args.skip_memory else args.memory_batch)
    timing.write_results(args.name, "# Per-layer gradient norms, CPU\n\n" + "\n\n".join(sections) + "\n", report,
                         args.out)
    return 0


EVALUATIONS = {"layer-grads": ("per-layer gradient norms: probe graph vs vmap(grad) vs the per-sample loop",
                               add_arguments, run)}
