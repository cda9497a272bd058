"""Hand rule vs generic rule, per operation: where the hand-written backward rules are worth keeping.

For each operation (one call at the shape it has in a ResNet-50 / MobileNetV3 / ConvNeXt at 224x224), the
graph ``input, output gradient -> forward of the call + its input gradient`` is exported twice, once with the
hand rule and once with the generic rule (the call's VJP traced from autograd with make_fx), and the two ONNX
Runtime sessions are timed in alternation (pinned threads, spinning off, batch 32). Writes
``benchmarks/results/rules_speed.{json,md}``::

    .venv-peers/bin/python -m benchmarks.rules_speed     # or the main venv
Timing and result files: ``benchmarks/harness``.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .harness import timing

BATCH = 32


class Call(nn.Module):
    def __init__(self, layer: nn.Module | None = None, function=None):
        super().__init__()
        self.layer, self.function = layer, function

    def forward(self, x):
        return self.layer(x) if self.layer is not None else self.function(x)


def _bn(channels: int) -> nn.Module:
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    return bn


CASES = {  # name: (call, per-sample input shape)
    "ReLU [64, 56, 56]": (Call(nn.ReLU()), (64, 56, 56)),
    "Conv2d 3x3 64->64 [56, 56]": (Call(nn.Conv2d(64, 64, 3, padding=1, bias=False)), (64, 56, 56)),
    "Conv2d 3x3 s2 128->128 [56, 56]": (Call(nn.Conv2d(128, 128, 3, 2, 1, bias=False)), (128, 56, 56)),
    "depthwise 5x5 [240, 14, 14]": (Call(nn.Conv2d(240, 240, 5, padding=2, groups=240, bias=False)), (240, 14, 14)),
    "BatchNorm2d eval [256, 56, 56]": (Call(_bn(256)), (256, 56, 56)),
    "MaxPool2d(3, 2, 1) [64, 112, 112]": (Call(nn.MaxPool2d(3, 2, 1)), (64, 112, 112)),
    "SiLU [96, 56, 56]": (Call(nn.SiLU()), (96, 56, 56)),
    "GELU [56, 56, 384]": (Call(nn.GELU()), (56, 56, 384)),
    "Linear 96->384 [56, 56]": (Call(nn.Linear(96, 384)), (56, 56, 96)),
    "AvgPool2d(2, 2, ceil, no pad count) [256, 56, 56]": (
        Call(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)), (256, 56, 56)),
    "SE gate x * sigmoid(mean) [96, 56, 56]": (
        Call(function=lambda x: x * torch.sigmoid(x.mean((2, 3), keepdim=True))), (96, 56, 56)),
}


class VJP(nn.Module):
    """images, output gradient -> the call's input gradient, from the forward values, by one backward step."""

    def __init__(self, call: nn.Module, shape, hand_rules: bool):
        super().__init__()
        from gradprobe.export.backward import Backward
        from gradprobe.export.generic import VJPCache
        from gradprobe.export.graph import ProbeGraph

        self.graph_module = fx.symbolic_trace(call)
        self.graph_module.gradprobe_batched = frozenset(self.graph_module.graph.nodes)
        self.nodes = [n for n in self.graph_module.graph.nodes if n.op in ("call_module", "call_function",
                                                                             "call_method")]
        self.x_node = next(n for n in self.graph_module.graph.nodes if n.op == "placeholder")
        self.output = next(n for n in self.graph_module.graph.nodes if n.op == "output").args[0]
        env = self._env(torch.randn(7, *shape))
        graph = ProbeGraph(self.graph_module, self.nodes[0], self.nodes[0], self.output, "", "")
        self.backward = Backward(graph, env, self.nodes, set(self.nodes) | {self.x_node}, hand_rules, VJPCache())
        self.used = sorted({"hand" if s.rule else "generic" for s in self.backward.steps.values()
                            if s.rule or s.generic})

    def _env(self, x):
        interpreter = fx.Interpreter(self.graph_module, garbage_collect_values=False)
        interpreter.run(x)
        return dict(interpreter.env)

    def forward(self, x, grad):
        env = self._env(x)
        return self.backward.run(env, grad, self.nodes, keep={self.x_node})[self.x_node].expand_as(x)


def _export(module: nn.Module, x, grad) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with tempfile.TemporaryDirectory() as folder, redirect_stdout(io.StringIO()):
        path = Path(folder) / "vjp.onnx"
        torch.onnx.export(module, (x, grad), str(path), dynamo=True, input_names=["x", "grad"],
                          dynamic_shapes=({0: batch}, {0: batch}), external_data=False)
        return path.read_bytes()


def _session(data: bytes, threads: int):
    from gradprobe.runtime import create_backend

    return create_backend("onnxruntime", data, threads=threads, spinning=False)


def main(threads: int = 2, blocks: int = 9) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    results = {}
    for name, (call, shape) in CASES.items():
        call.eval()
        x = torch.randn(BATCH, *shape)
        with torch.no_grad():
            grad = torch.randn_like(call(x))
        sessions, check = {}, {}
        for kind, hand in (("hand", True), ("generic", False)):
            module = VJP(call, shape, hand)
            sessions[kind] = _session(_export(module, x[:3], grad[:3]), threads)
            check[kind] = module.used
        feeds = {"x": x.numpy(), "grad": grad.numpy()}
        outputs = {k: next(iter(s.infer(feeds).values())) for k, s in sessions.items()}
        agree = float(np.abs(outputs["hand"] - outputs["generic"]).max() / (np.abs(outputs["hand"]).max() + 1e-30))
        engines = {kind: session.infer for kind, session in sessions.items()}
        policies = {kind: timing.RoundsPolicy(budget_s=0.0, min_rounds=1, max_rounds=1) for kind in engines}
        times = timing.time_interleaved(engines, feeds, policies, rounds={kind: blocks for kind in engines})
        row = {k: timing.summarize(v)["median_ms"] for k, v in times.items()}
        row.update({"generic_over_hand": row["generic"] / row["hand"], "relative_difference": agree,
                    "rules": check})
        results[name] = row
        print(f"{name}: hand {row['hand']:.1f} ms, generic {row['generic']:.1f} ms "
              f"(x{row['generic_over_hand']:.2f}), outputs agree to {agree:.1e}", flush=True)
    environment = timing.environment(threads, batch=BATCH, load=os.getloadavg())
    lines = ["# Hand rule vs generic rule, one call each (ONNX Runtime, batch 32)", "",
             f"`python -m benchmarks.rules_speed`: the forward of one call plus its input gradient, exported once with the "
             f"hand rule and once with the generic (autograd-derived, make_fx) rule; medians of {blocks} interleaved "
             f"runs, {threads} threads, spinning off; load average {environment['load']} (a shared machine).", "",
             "| call | hand ms | generic ms | generic / hand | outputs agree |", "|---|---|---|---|---|"]
    for name, row in results.items():
        lines.append(f"| {name} | {row['hand']:.1f} | {row['generic']:.1f} | {row['generic_over_hand']:.2f} | "
                     f"{row['relative_difference']:.1e} |")
    timing.publish("rules_speed", "\n".join(lines) + "\n", {"_environment": environment, **results})


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
