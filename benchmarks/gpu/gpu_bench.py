"""GPU latency of the probe, in one process, one prepared script (``run_gpu_bench.sh``): under 8 minutes on an H200.

For the ResNet-18 layout at 32x32 and 224x224 and one zoo model (torchvision efficientnet_b0 at 64x64 where
torchvision is there), at batch 1, 32 and 256, timed with CUDA events (p50/p90 of repeats after warm-up), each
as a ratio to the plain forward of the same model, batch and size:
  forward        the classifier alone (torch, eager);
  probe          the probe module (every map and last-layer norm: the export's graph as torch ops), eager;
  probe-graph    the same, captured once as a CUDA graph and replayed;
  layer-grads    the probe module with every per-layer norm, tap columns completed by the CUDA kernels
                 (``gradprobe.kernels.write_tap_column`` on device tensors);
  reference      the research way: per sample, one full backward per label and per map (batches 1 and 32);
  grad-cam       pytorch-grad-cam's GradCAM, where it is importable;
  ort-cuda       ONNX Runtime's CUDA provider on the exported graph, where onnxruntime-gpu is installed;
  tensorrt       a TensorRT engine of the graph (fp32 and fp16), where TensorRT is installed.
Then the kernel checks (``gpu_checks.kernel_checks``): kernels vs the numpy oracle, vs torch.func vmap(grad)
and vs the copy-bandwidth floor measured in this run (target: >= 70 % of copy bandwidth).

Every section is independent: a failure prints its reason and the run goes on; a section that would
overrun the time budget is skipped and says so. Results: JSON and a markdown table in ``--out``.
``--device cpu --quick`` runs the same code paths on a CPU at toy sizes (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))

BATCHES = (1, 32, 256)
BUDGET_S = 450.0  # 7.5 minutes of the 8: the rest is start-up and the table


class Run:
    """Time budget, device, and the rows and notes of the report."""

    def __init__(self, device: str, budget: float, quick: bool, save=None):
        self.device, self.deadline, self.quick = torch.device(device), time.perf_counter() + budget, quick
        self.rows, self.notes, self.sections = [], [], {}
        self.save = save or (lambda: None)  # writes the report so far: a kill at the time limit loses nothing

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def section(self, name: str, function, *args, need_s: float = 5.0, **kwargs):
        """Run one section; print and record its failure or its skip, never stop the run."""
        if self.left() < need_s:
            self.note(f"{name}: skipped, {self.left():.0f} s of the budget left (needs ~{need_s:.0f} s)")
            return None
        started = time.perf_counter()
        try:
            result = function(*args, **kwargs)
            self.sections[name] = {"ok": True, "seconds": round(time.perf_counter() - started, 1)}
            return result
        except Exception as error:  # every section is independent: report and go on
            self.sections[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
            print(f"[{name}] FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
            traceback.print_exc(limit=3)
            return None
        finally:
            self.save()

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.notes.append(text)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, function, *, repeats: int, warmup: int = 2) -> list[float]:
        """Milliseconds per call: CUDA events on the GPU (perf_counter on the CPU smoke run)."""
        for _ in range(warmup):
            function()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                function()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                started = time.perf_counter()
                function()
                times.append((time.perf_counter() - started) * 1e3)
        return times

    def record(self, model: str, size: int, batch: int, engine: str, times: list[float], **extra) -> None:
        times = sorted(times)
        row = {"model": model, "size": size, "batch": batch, "engine": engine, "p50_ms": statistics.median(times),
               "p90_ms": times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))], "repeats": len(times),
               **extra}
        self.rows.append(row)
        print(f"  {model:<16} {size:>3}px batch {batch:>3}  {engine:<18} p50 {row['p50_ms']:9.3f} ms  "
              f"p90 {row['p90_ms']:9.3f} ms", flush=True)


def repeats_for(milliseconds: float, budget_ms: float = 1500.0, low: int = 5, high: int = 50) -> int:
    return int(max(low, min(high, budget_ms / max(milliseconds, 1e-3))))


# ----------------------------------------------------------------------------------------------- models
def resnet18():
    from gradprobe.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", in_channels=3).eval()


def zoo_model():
    """torchvision efficientnet_b0 (depthwise convs, SiLU, squeeze-excitation), 10 classes, random init."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def probe_module(model, size: int, layer_grads: bool):
    """The export's probe module (prepare, trace, build) for ``model`` at ``size``, plus its layer-norm plan."""
    from gradprobe.export.graph import trace
    from gradprobe.export.pipeline import build, prepare

    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    prepared = prepare(model, example, None)
    graph = trace(model, prepared.normalized(), None)
    probe, norms, _ = build(prepared, graph, layer_grads, "bce")
    return probe.eval(), norms


# --------------------------------------------------------------------------------------------- sections
def bench_model(run: Run, name: str, model, size: int, batches) -> None:
    device = run.device
    model = model.to(device)
    forward_ms = {}
    images = {b: torch.rand(b, 3, size, size, device=device) for b in batches}
    contrast = {b: torch.full((b,), -1, dtype=torch.int64, device=device) for b in batches}

    def forward():
        for batch in batches:
            with torch.no_grad():
                first = run.time(lambda: model(images[batch]), repeats=3, warmup=1)
                times = run.time(lambda: model(images[batch]), repeats=repeats_for(statistics.median(first)))
            forward_ms[batch] = statistics.median(times)
            run.record(name, size, batch, "forward", times, ratio=1.0)

    run.section(f"{name}/{size}/forward", forward)

    def ratio(batch, times):
        return statistics.median(times) / forward_ms[batch] if batch in forward_ms else None

    built = run.section(f"{name}/{size}/build-probe", probe_module, model.cpu(), size, False, need_s=20)
    model.to(device)
    if built:
        probe = built[0].to(device)

        def eager():
            for batch in batches:
                with torch.no_grad():
                    call = lambda: probe(images[batch], contrast[batch])  # noqa: E731
                    first = run.time(call, repeats=2, warmup=1)
                    times = run.time(call, repeats=repeats_for(statistics.median(first)))
                run.record(name, size, batch, "probe", times, ratio=ratio(batch, times))

        run.section(f"{name}/{size}/probe", eager, need_s=10)

        def graphed():
            for batch in batches:
                static_in, static_q = images[batch].clone(), contrast[batch].clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.no_grad():
                    for _ in range(3):  # warm-up on a side stream, as CUDA-graph capture wants
                        probe(static_in, static_q)
                torch.cuda.current_stream().wait_stream(stream)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph), torch.no_grad():
                    static_out = probe(static_in, static_q)
                times = run.time(cuda_graph.replay, repeats=repeats_for(1.0, high=100))
                with torch.no_grad():
                    expected = probe(static_in, static_q)
                cuda_graph.replay()
                run.sync()
                drift = max(float((static_out[k].double() - expected[k].double()).abs().max())
                            for k in expected if expected[k].is_floating_point())
                run.record(name, size, batch, "probe-graph", times, ratio=ratio(batch, times), max_abs_vs_eager=drift)

        if device.type == "cuda":
            run.section(f"{name}/{size}/probe-cuda-graph", graphed, need_s=10)
        del probe

    run.section(f"{name}/{size}/layer-grads", layer_grads, run, name, model, size, batches, images, contrast, ratio,
                need_s=30)
    run.section(f"{name}/{size}/reference", reference, run, name, model, size, images, ratio, need_s=20)
    run.section(f"{name}/{size}/grad-cam", grad_cam, run, name, model, size, batches, images, ratio, need_s=10)
    run.section(f"{name}/{size}/deployed", deployed, run, name, model, size, batches, images, ratio, need_s=60)
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def layer_grads(run, name, model, size, batches, images, contrast, ratio):
    """Every parameter tensor's per-sample norm: the graph's columns plus the CUDA kernels' tap columns."""
    from gradprobe import kernels

    probe, norms = probe_module(model.cpu(), size, True)
    model.to(run.device)
    probe = probe.to(run.device)
    taps = [(column, entry.spec) for column, entry in enumerate(norms) if entry.form == "tap"]

    def full(batch):
        with torch.no_grad():
            outputs = probe(images[batch], contrast[batch])
        result = outputs["layer_grad_sqnorm"]
        host = result.numpy() if not result.is_cuda else None  # the CPU smoke run: numpy kernels in place
        for column, spec in taps:
            x, g = (outputs.pop(f"{kind}_{column}").contiguous() for kind in ("tap_input", "tap_grad"))
            kernels.write_tap_column(result if host is None else host, column, x if host is None else x.numpy(),
                                     g if host is None else g.numpy(), spec)
        return result

    for batch in batches:
        first = run.time(lambda: full(batch), repeats=2, warmup=1)
        times = run.time(lambda: full(batch), repeats=repeats_for(statistics.median(first), high=20))
        run.record(name, size, batch, "layer-grads", times, ratio=ratio(batch, times), tensors=len(norms),
                   kernel_taps=len(taps))


def reference(run, name, model, size, images, ratio):
    """The research-style loop (``gradprobe.export.reference.ResearchReference``'s steps, on the device):
    per sample, forward, one backward per label, one for the confounding label, one per map."""
    import torch.nn.functional as F

    from gradprobe.export import maps as explanation_maps
    from gradprobe.export.graph import trace

    graph = trace(model.cpu(), torch.rand(1, 3, size, size), None)
    model.to(run.device)
    target, linear = model.get_submodule(graph.target_name), model.get_submodule(graph.linear_name)

    def per_sample(x):
        captured = {}
        hook = target.register_forward_hook(lambda _m, _i, output: captured.update(activation=output))
        try:
            for index in range(len(x)):
                logits = model(x[index:index + 1])
                activation = captured["activation"]
                activation.retain_grad()
                pred = int(logits.argmax(1))
                q = int(torch.argsort(logits[0], descending=True)[1])
                for label in range(logits.shape[1]):
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(logits, torch.tensor([label], device=x.device)).backward(retain_graph=True)
                    float(linear.weight.grad.pow(2).sum() + linear.bias.grad.pow(2).sum())
                model.zero_grad(set_to_none=True)
                F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="sum").backward(
                    retain_graph=True)
                float(linear.weight.grad.pow(2).sum())
                for spec in explanation_maps.MAPS:
                    activation.grad = None
                    model.zero_grad(set_to_none=True)
                    explanation_maps.TARGETS[spec.target].scalar(logits, pred, q).backward(retain_graph=True)
                    explanation_maps.weighted_map(spec, activation.grad, activation.detach()).cpu()
        finally:
            hook.remove()

    for batch in (b for b in (1, 32) if b in images):
        first = run.time(lambda: per_sample(images[batch]), repeats=1, warmup=1)
        times = run.time(lambda: per_sample(images[batch]), repeats=3 if statistics.median(first) < 3000 else 1,
                         warmup=0)
        run.record(name, size, batch, "reference", times, ratio=ratio(batch, times))
    run.note(f"{name} {size}px: the research reference runs batches 1 and 32 only (per-sample loop; batch 256 "
             "would take most of the budget)")


def grad_cam(run, name, model, size, batches, images, ratio):
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        run.note("pytorch-grad-cam is not importable here: the grad-cam rows are absent")
        return
    from gradprobe.export.graph import trace

    graph = trace(model.cpu(), torch.rand(1, 3, size, size), None)
    model.to(run.device)
    with GradCAM(model=model, target_layers=[model.get_submodule(graph.target_name)]) as cam:
        for batch in batches:
            call = lambda: cam(input_tensor=images[batch], targets=None)  # noqa: E731
            first = run.time(call, repeats=2, warmup=1)
            times = run.time(call, repeats=repeats_for(statistics.median(first), high=20))
            run.record(name, size, batch, "grad-cam", times, ratio=ratio(batch, times))


def deployed(run, name, model, size, batches, images, ratio):
    """ORT-CUDA and TensorRT on the exported graph, where they are installed (the export itself is skipped
    when neither is: it runs on the CPU and costs minutes at 224x224)."""
    import importlib.util

    import onnxruntime as ort

    have_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    have_trt = importlib.util.find_spec("tensorrt") is not None
    if not (have_ort_cuda or have_trt):
        run.note(f"{name} {size}px: neither onnxruntime-gpu nor TensorRT is installed here: no ort-cuda or "
                 "tensorrt rows")
        return
    import gradprobe

    folder = Path(tempfile.mkdtemp(prefix="gradprobe-bench-"))
    example = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    bundle = gradprobe.export(model.cpu(), example, folder / name)
    model.to(run.device)
    host = {b: images[b].cpu().numpy() for b in batches}
    if have_ort_cuda:
        with gradprobe.load(bundle, providers=["cuda"]) as probe:
            for batch in batches:
                times = run.time(lambda: probe.run(host[batch]), repeats=10)
                run.record(name, size, batch, "ort-cuda", times, ratio=ratio(batch, times), **probe.engine.describe())
    if have_trt:
        from gradprobe.export.tensorrt_build import build_engine

        for fp16 in (False, True):
            build_engine(bundle, fp16=fp16, batch=f"1:32:{max(batches)}")
            with gradprobe.load(bundle, backend="tensorrt", precision="fp16" if fp16 else "fp32") as probe:
                for batch in batches:
                    times = run.time(lambda: probe.run(host[batch]), repeats=10)
                    run.record(name, size, batch, f"tensorrt-{'fp16' if fp16 else 'fp32'}", times,
                               ratio=ratio(batch, times))


def kernels_section(run, size: int, batch: int, forms=("auto", "direct", "gram")):
    from gpu_checks import kernel_checks

    result = kernel_checks(size=size, batch=batch, vmap_repeats=2, forms=forms)
    run.sections[f"kernels/{size}/{batch}/result"] = result
    return result


# ---------------------------------------------------------------------------------------------- report
def markdown(run: Run, meta: dict) -> str:
    lines = [f"# GPU latency ({meta['device']}, torch {meta['torch']})", "",
             "p50 / p90 in ms (CUDA events); ratio = p50 / p50 of the plain forward, same model, size and batch.", "",
             "| model | size | batch | engine | p50 ms | p90 ms | ratio |", "|---|---|---|---|---|---|---|"]
    for row in run.rows:
        ratio = "" if row.get("ratio") is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['model']} | {row['size']} | {row['batch']} | {row['engine']} | {row['p50_ms']:.3f} | "
                     f"{row['p90_ms']:.3f} | {ratio} |")
    kernels = [v for k, v in run.sections.items() if k.endswith("/result")]
    if kernels:
        lines += ["", "| kernels | batch | kernels ms | vmap(grad) ms | floor ms | % of copy bandwidth | "
                      "err vs numpy | err vs vmap |", "|---|---|---|---|---|---|---|---|"]
        for k in kernels:
            lines.append(f"| ResNet-18 {k['size']}px | {k['batch']} | {k['kernel_ms']['auto']:.3f} | "
                         f"{k['vmap_ms']:.1f} | "
                         f"{k['bandwidth_floor_ms']:.3f} | {100 * k['fraction_of_copy_bandwidth']:.0f} % | "
                         f"{k['max_error_vs_numpy']:.1e} | {k['max_error_vs_vmap']:.1e} |")
    failed = {k: v["error"] for k, v in run.sections.items() if isinstance(v, dict) and v.get("ok") is False}
    if failed or run.notes:
        lines += [""] + [f"- FAILED {k}: {v}" for k, v in failed.items()] + [f"- {n}" for n in run.notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--quick", action="store_true", help="toy sizes (a smoke test of the script)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU machine (or --device cpu --quick for a smoke test)")
        return 2
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
            "batches": list(BATCHES), "budget_s": args.budget_s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": run.rows, "sections": run.sections,
                                                        "notes": run.notes}, indent=2, default=str))
        (out / "gpu_bench.md").write_text(markdown(run, meta))

    run = Run(args.device, args.budget_s, args.quick, save)
    print(json.dumps(meta), flush=True)
    torch.backends.cudnn.benchmark = False
    batches = (1, 4) if args.quick else BATCHES
    cases = [("resnet18", resnet18, 32), ("resnet18", resnet18, 224), ("efficientnet_b0", zoo_model, 64)]
    if args.quick:
        cases = [("resnet18", resnet18, 32)]
    if args.device == "cuda":  # first: the kernels' checks are what the latency rows rest on
        run.section("kernels/32/256", kernels_section, run, 32, 256, need_s=30)
    for name, make, size in cases:
        model = run.section(f"{name}/model", make, need_s=1)
        if model is not None:
            bench_model(run, name, model, size, batches)
    if args.device == "cuda":
        run.section("kernels/224/32", kernels_section, run, 224, 32, ("auto", "direct"), need_s=40)
    save()
    print("\n" + markdown(run, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
