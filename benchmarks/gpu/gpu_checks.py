"""GPU checks of the CUDA norm kernels, at ResNet-18 CIFAR shapes and batch 256 (see run_gpu_checks.sh; gpu_bench.py
runs ``kernel_checks`` as one of its sections, at 32x32 and 224x224).

For every conv and linear weight of a ResNet-18 (3x32x32, 10 classes): take the layer input x and output
gradient g of the all-ones confounding loss from one batched backward on the GPU, run our kernel (the form
the cost model picks, and the other form too) on the device tensors, compare with the numpy oracle, and time:
- the kernels over all layers (CUDA events, median of repeats),
- torch.func vmap(grad) for the same per-sample norms,
- the bandwidth floor: bytes the kernels must read (x and g of every layer) / device copy bandwidth
  measured in this run.
"""
from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from gradprobe.kernels import ConvSpec, choose_form, conv_weight_sqnorm, linear_weight_sqnorm
from gradprobe.kernels.cuda_norms import CudaNormKernels, compile_ptx
from gradprobe.models import build_model

BATCH = 256


def cuda_time(fn, repeats=10, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script runs on a GPU machine)")
        return 2
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    result = kernel_checks()
    print(json.dumps(result))
    return 0 if result["max_error_vs_numpy"] < 1e-4 and result["max_error_vs_vmap"] < 1e-3 else 1


def kernel_checks(size: int = 32, batch: int = BATCH, vmap_repeats: int = 3,
                  forms: tuple = ("auto", "direct", "gram")) -> dict:
    """Kernels vs the numpy oracle, vs torch.func vmap(grad) and vs the copy-bandwidth floor, for ResNet-18 at
    ``size`` x ``size`` and ``batch``, for the layer forms in ``forms`` ("auto": the cost model's choice;
    forcing "gram" on the early layers of a 224x224 model is slow by design); prints a table, returns numbers."""
    BATCH = batch  # noqa: N806 - the module default, overridden per call
    ptx = compile_ptx()
    print(f"NVRTC compiled sqnorm.cu: {len(ptx)} bytes of PTX")
    kernels = CudaNormKernels()

    torch.manual_seed(0)
    model = build_model("resnet18", in_channels=3).cuda().eval()
    x = torch.rand(BATCH, 3, size, size, device="cuda")
    taps = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            taps[name] = (inputs[0], output)
        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    z = model(x)
    torch.nn.functional.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="sum").backward()
    for h in handles:
        h.remove()
    inputs = {n: taps[n][0].detach().contiguous() for n in layers}
    grads = {n: taps[n][1].grad.detach().contiguous() for n in layers}

    specs = {}
    for name, module in layers.items():
        if isinstance(module, torch.nn.Conv2d):
            specs[name] = ConvSpec(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   module.padding, module.dilation, module.groups)
    outs = {n: torch.zeros(BATCH, dtype=torch.float64, device="cuda") for n in layers}

    def run_all(forms):
        for name, module in layers.items():
            outs[name].zero_()
            if name in specs:
                kernels.conv_weight_sqnorm(inputs[name], grads[name], specs[name], outs[name], forms[name])
            else:
                kernels.linear_weight_sqnorm(inputs[name], grads[name], outs[name])

    auto = {n: choose_form(s, grads[n].shape[2] * grads[n].shape[3]) for n, s in specs.items()}
    rows, worst, oracles = [], 0.0, {}
    variants = {"auto": auto, "direct": {n: "direct" for n in specs}, "gram": {n: "gram" for n in specs}}
    for form_name in forms:
        forms_here = variants[form_name]
        run_all(forms_here)
        torch.cuda.synchronize()
        for name in layers:
            ours = outs[name].cpu().numpy()
            if name not in oracles:  # the numpy oracle on 16 samples, once per layer
                xs, gs = inputs[name][:16].cpu().numpy(), grads[name][:16].cpu().numpy()
                oracles[name] = conv_weight_sqnorm(xs, gs, specs[name], "direct") if name in specs \
                    else linear_weight_sqnorm(xs, gs)
            oracle = oracles[name]
            error = float(np.max(np.abs(ours[:16] - oracle) / np.maximum(np.abs(oracle), 1e-30)))
            worst = max(worst, error)
            if form_name == "auto":
                rows.append((name, forms_here.get(name, "linear"), tuple(grads[name].shape[1:]), error))
        print(f"forms={form_name}: max relative error vs numpy oracle (16 samples/layer) {worst:.2e}")

    print("\nlayer, form chosen, output-gradient shape, rel. error vs numpy")
    for row in rows:
        print(f"  {row[0]:<26} {row[1]:<7} {str(row[2]):<18} {row[3]:.1e}")

    timings = {f: cuda_time(lambda f=f: run_all(variants[f])) for f in forms}

    read_bytes = sum(inputs[n].numel() * 4 + grads[n].numel() * 4 for n in layers)
    big = torch.empty(read_bytes // 4, device="cuda")
    copy_ms = cuda_time(lambda: big.clone())
    bandwidth = 2 * big.numel() * 4 / (copy_ms / 1e3)  # read + write
    floor_ms = read_bytes / bandwidth * 1e3

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    names = [n + ".weight" for n in layers]

    def confounding(p, sample):
        out = functional_call(model, (p, buffers), (sample[None],))
        return torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="sum")

    def vmap_norms():
        per_sample = vmap(grad(confounding), in_dims=(None, 0))(params, x)
        return [per_sample[n].pow(2).flatten(1).sum(1) for n in names]

    torch.cuda.reset_peak_memory_stats()
    reference = vmap_norms()
    vmap_peak = torch.cuda.max_memory_allocated() / 2**30
    vmap_ms = cuda_time(vmap_norms, repeats=vmap_repeats, warmup=1)
    run_all(auto)
    torch.cuda.synchronize()
    agreement = max(float(((outs[n].float() - r).abs() / r.abs().clamp_min(1e-30)).max())
                    for n, r in zip(layers, reference))

    achieved = read_bytes / (timings["auto"] / 1e3)
    result = {"size": size, "batch": BATCH, "layers": len(layers), "kernel_ms": timings, "vmap_ms": vmap_ms,
              "vmap_peak_gib": vmap_peak, "bytes_read_mib": read_bytes / 2**20,
              "copy_bandwidth_gbs": bandwidth / 1e9, "bandwidth_floor_ms": floor_ms,
              "achieved_read_gbs": achieved / 1e9, "fraction_of_copy_bandwidth": achieved / bandwidth,
              "max_error_vs_numpy": worst, "max_error_vs_vmap": agreement}
    print(f"\nResNet-18 {size}x{size}, batch {BATCH}, {len(layers)} weight tensors (conv + linear)")
    print("| engine | median ms | vs floor |")
    print("|---|---|---|")
    for form, ms in timings.items():
        print(f"| CUDA kernels, forms={form} | {ms:.3f} | {ms / floor_ms:.1f}x |")
    print(f"| torch.func vmap(grad) (incl. its forward+backward) | {vmap_ms:.1f} | {vmap_ms / floor_ms:.0f}x |")
    print(f"| bandwidth floor ({read_bytes / 2**20:.0f} MiB at {bandwidth / 1e9:.0f} GB/s copy) | "
          f"{floor_ms:.3f} | 1.0x |")
    print(f"kernels read at {achieved / 1e9:.0f} GB/s = {100 * achieved / bandwidth:.0f}% of copy bandwidth "
          f"(target >= 70%: {'met' if achieved >= 0.7 * bandwidth else 'NOT met'})")
    print(f"vmap(grad) peak GPU memory {vmap_peak:.1f} GiB; kernels agree with vmap to {agreement:.1e}")
    return result


if __name__ == "__main__":
    sys.exit(main())
