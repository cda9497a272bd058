"""Side-by-side CPU latency of four engines on the same model and the same input batch.

- **(a)** logits only: the ``images -> logits`` subgraph extracted from the bundle's graph with
  ``onnx.utils.Extractor`` (so its forward ops are exactly those of (b)), run by the ONNX Runtime backend.
- **(b)** the probe graph with every output (logits, gradient norms, every explanation map) through the
  runtime's ``ProbeEngine``, as ``Probe.run`` runs it.
- **(c)** the research-style eager reference (``gradprobe.export.reference.ResearchReference``): per
  sample, a forward, then one autograd backward per label and per map. Needs the bundle's weights and torch.
- **(d)** pytorch-grad-cam ``GradCAM`` (``targets=None``: the predicted class) on the bundle's target
  layer, for the whole batch, in the peers venv (``benchmarks/peers/gradcam_timing.py``) right after (a)-(c).

(a) and (b) are timed interleaved call by call (their ratio is the tight one), then (c) in the same process
(interleaved with ORT, each multi-second eager call leaves ORT's caches and threads cold), then (d); (b) is
timed again after (d) as a check that the machine stayed the same. Every ORT backend has spinning off and
the given thread count; torch uses the same. Ratios (b)/(a), (c)/(b), (d)/(b) are quotients of medians.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from gradprobe.base.bundle import Bundle
from gradprobe.base.errors import DataError, InputError
from gradprobe.base.manifest import Manifest

from .harness import peers, timing

ENGINES = {
    "a": "ORT logits only",
    "b": "ORT probe graph, all outputs",
    "c": "research reference (eager, per sample)",
    "d": "pytorch-grad-cam GradCAM (batched)",
}
RATIOS = (("b/a", "b", "a"), ("c/b", "c", "b"), ("d/b", "d", "b"))
#: Targets on CPU at batch 64 on the shipped ResNet.
TARGETS = (timing.Target("b/a", "<=", 1.10, {"batch": 64}), timing.Target("c/b", ">=", 30.0, {"batch": 64}))
#: Default rounds per engine and batch: about ``budget_s`` of timed calls after the warm-up.
POLICIES = {"a": timing.RoundsPolicy(3.0, 20, 200, warmup=5), "b": timing.RoundsPolicy(3.0, 20, 200, warmup=5),
            "c": timing.RoundsPolicy(8.0, 5, 30, warmup=1), "d": timing.RoundsPolicy(5.0, 10, 100, warmup=3)}


# --------------------------------------------------------------------------------------------- inputs
def input_batch(manifest: Manifest, batch: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The first ``batch`` Fashion-MNIST test images when the bundle takes 1x28x28, else seeded uniform noise."""
    if tuple(manifest.input.shape) == (1, 28, 28):
        try:
            from gradprobe.data import fashion_mnist

            images, _ = fashion_mnist("test")
            if len(images) >= batch:
                return np.ascontiguousarray(images[:batch]), f"Fashion-MNIST test[:{batch}]"
        except DataError:  # no local data set: noise, and the report says so
            pass
    low, high = manifest.input.range
    rng = np.random.default_rng(seed)
    images = (low + (high - low) * rng.random((batch, *manifest.input.shape))).astype(np.float32)
    return images, f"uniform noise in [{low}, {high}], seed {seed}"


# -------------------------------------------------------------------------------------------- engines
def logits_only_graph(graph: bytes) -> bytes:
    """The ``images -> logits`` subgraph of a probe graph (identical forward ops), serialized."""
    import onnx
    import onnx.utils

    extracted = onnx.utils.Extractor(onnx.load_from_string(graph)).extract_model(["images"], ["logits"])
    return extracted.SerializeToString()


def ort_backend(graph: bytes, threads: int):
    """The ONNX Runtime backend as every benchmark runs it: pinned threads, spinning off."""
    from gradprobe.runtime import create_backend

    return create_backend("onnxruntime", graph, threads=threads, spinning=False)


def build_engines(bundle: str | os.PathLike, threads: int = 2, engines=("a", "b", "c")) -> tuple[dict, list[str]]:
    """``({name: fn(images) -> outputs}, skipped reasons)`` for the in-process engines among (a), (b), (c)."""
    opened = Bundle.open(bundle)
    manifest = opened.manifest
    built, skipped = {}, []
    if "a" in engines or "b" in engines:
        graph = opened.read(manifest.graph)
    if "a" in engines:
        logits = ort_backend(logits_only_graph(graph), threads)
        if logits.output_names != ["logits"]:
            raise InputError(f"the extracted logits-only graph has outputs {logits.output_names}, not ['logits']")
        built["a"] = lambda x: logits.infer({"images": x})
    if "b" in engines:
        from gradprobe.runtime import ProbeEngine

        engine = ProbeEngine(ort_backend(graph, threads), manifest)

        def run_b(x):  # contrast -1: the runner-up, as Probe.run(images) asks for
            return engine.infer(x, {"contrast": np.full(len(x), -1, dtype=np.int64)})

        built["b"] = run_b
    if "c" in engines:
        reason = _reference_unavailable(manifest)
        if reason:
            skipped.append(f"(c) skipped: {reason}")
        else:
            built["c"] = _reference_engine(opened, threads)
    return built, skipped


def _reference_unavailable(manifest: Manifest) -> str | None:
    if not manifest.model.weights:
        return "bundle has no model weights (model.safetensors); export a gradprobe reference model"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed: pip install 'gradprobe[export]'"
    return None


def _reference_engine(opened: Bundle, threads: int):
    import torch

    from gradprobe.export.reference import ResearchReference
    from gradprobe.models import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(opened.read(opened.manifest.model.weights))
    reference = ResearchReference.for_bundle(model, opened.manifest)  # the bundle's target, head, maps
    return lambda x: reference.run(x, None)


def gradcam_peer(bundle, batches: dict[int, np.ndarray], rounds: int | None, threads: int = 2,
                 python=None) -> dict:
    """Engine (d) in the peers venv: ``{"batches": {"B": [seconds, ...]}, ...}`` (see gradcam_timing.py)."""
    spec = {**peers.model_spec(bundle, threads), "policy": vars(POLICIES["d"]), "batches": []}
    with tempfile.TemporaryDirectory(prefix="gradprobe-bench-") as folder:
        for batch, images in batches.items():
            path = Path(folder) / f"batch{batch}.npy"
            np.save(path, images)
            spec["batches"].append({"batch": int(batch), "images": str(path), "rounds": rounds})
        return peers.run_peer("gradcam_timing.py", spec, python=python, threads=threads, timeout=1800)


# ---------------------------------------------------------------------------------------------- run
def row(engine: str, batch: int, seconds) -> dict:
    return {"engine": engine, "label": ENGINES[engine], "batch": int(batch), **timing.summarize(seconds)}


def compose(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ratios of medians per batch, and the target checks."""
    ratios = timing.compose_ratios(rows, RATIOS)
    return ratios, timing.check_targets(TARGETS, ratios)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def run_latency(bundle: str | os.PathLike, batches=(1, 64), rounds: int | None = None, threads: int = 2,
                peers_python=None, progress: bool = True, engines=("a", "b", "c", "d")) -> dict:
    """Time engines (a)-(d) on ``bundle`` at each batch size; see the module docstring.

    ``rounds``: timed calls per engine and batch (None: ``POLICIES``). ``peers_python``: the peers venv's
    python for (d) (default: see ``harness.peers.find_peers_python``). Returns ``rows`` (engine, batch,
    median_ms, p90_ms, n, ...), ``ratios`` per batch, ``targets``, ``skipped`` (reasons), ``drift`` ((b)
    re-timed after (d)) and the ``environment`` with the CPU load met.
    """
    from tqdm.auto import tqdm

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    batches = sorted({_positive_int(b, "each batch size") for b in batches})
    if not batches:
        raise InputError("give at least one batch size")
    threads = _positive_int(threads, "threads")
    rounds = None if rounds is None else _positive_int(rounds, "rounds")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InputError(f"unknown engines {unknown}; expected some of {list(ENGINES)}")
    fixed = None if rounds is None else {name: rounds for name in ENGINES}
    rows, skipped, drift, extra = [], [], [], {}
    images, inputs = {}, {}
    for batch in batches:
        images[batch], inputs[str(batch)] = input_batch(manifest, batch)

    with timing.load_watch() as load:
        built, reasons = build_engines(opened.path, threads, [e for e in engines if e in "abc"])
        skipped += reasons
        blocks = [{k: fn for k, fn in built.items() if k in "ab"}, {k: fn for k, fn in built.items() if k == "c"}]
        with tqdm(total=None, desc="(a,b) interleaved, then (c)", unit="call", disable=not progress, leave=False,
                  file=sys.stderr) as bar:
            for batch in batches:
                bar.set_postfix(batch=batch)
                for block in (b for b in blocks if b):
                    times = timing.time_interleaved(block, images[batch], POLICIES, fixed, progress=bar)
                    rows += [row(name, batch, times[name]) for name in block]
        if "d" in engines:
            try:
                with tqdm(total=1, desc="(d) GradCAM in the peers venv", disable=not progress, leave=False,
                          file=sys.stderr) as bar:
                    peer = gradcam_peer(opened.path, images, rounds, threads, peers_python)
                    bar.update(1)
                rows += [row("d", batch, peer["batches"][str(batch)]) for batch in batches]
                extra["peers"] = {k: v for k, v in peer.items() if k != "batches"}
            except peers.PeersUnavailable as error:
                skipped.append(f"(d) skipped: {error}")
            except peers.PeersFailed as error:  # reported, never faked: (d) is absent and says why
                skipped.append(f"(d) failed: {str(error)[:600]}")
            if "b" in built and "peers" in extra:
                before = {r["batch"]: r["median_ms"] for r in rows if r["engine"] == "b"}
                for batch in batches:
                    again = timing.summarize(timing.time_interleaved(
                        {"b": built["b"]}, images[batch], POLICIES, {"b": POLICIES["b"].min_rounds})["b"])
                    drift.append({"batch": batch, "b_median_ms": before[batch], "b_after_d_median_ms":
                                  again["median_ms"], "ratio": again["median_ms"] / before[batch]})
        del built  # release the sessions and the torch model inside the watched span

    ratios, targets = compose(rows)
    return {
        "bundle": str(opened.path),
        "model": {"class": manifest.model.class_name, "config": manifest.model.config,
                  "parameters": manifest.model.parameters},
        "target_layer": manifest.classifier.target_layer,
        "maps": [spec.name for spec in manifest.classifier.maps],
        "engines": {k: ENGINES[k] for k in engines},
        "batches": batches,
        "inputs": inputs,
        "rounds": "default policy" if rounds is None else rounds,
        "policies": {name: vars(policy) for name, policy in POLICIES.items()},
        "environment": {**timing.environment(threads), **load},
        "method": ("(a),(b) timed interleaved round-robin after warm-up (single calls, perf_counter), then (c) in "
                   "the same process; (d) in a peers-venv subprocess right after; ORT spinning off, "
                   f"{threads} intra-op threads; torch.set_num_threads({threads}); ratios of medians"),
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "drift": drift,
        "skipped": skipped,
        **extra,
    }


# -------------------------------------------------------------------------------------------- report
def _fmt(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """Markdown: median / p90 / n per engine and batch, the ratios, the targets, the load and what was skipped."""
    batches = result["batches"]
    cells = {(r["engine"], r["batch"]): r for r in result["rows"]}
    lines = ["| engine | " + " | ".join(f"batch {b}: median ms | p90 ms | n" for b in batches) + " |",
             "|---|" + "---|---|---|" * len(batches)]
    for engine, label in result["engines"].items():
        parts = []
        for batch in batches:
            cell = cells.get((engine, batch))
            parts.append("— | — | 0" if cell is None else f"{cell['median_ms']:.3f} | {cell['p90_ms']:.3f} | {cell['n']}")
        lines.append(f"| ({engine}) {label} | " + " | ".join(parts) + " |")
    lines += ["", "| batch | (b)/(a) | (c)/(b) | (d)/(b) |", "|---|---|---|---|"]
    for entry in result["ratios"]:
        lines.append(f"| {entry['batch']} | {_fmt(entry['b/a'], 3)} | {_fmt(entry['c/b'], 1)} | {_fmt(entry['d/b'], 2)} |")
    lines += ["", *timing.target_lines(result["targets"])]
    for entry in result.get("drift", []):
        lines.append(f"- check: (b) at batch {entry['batch']} re-timed after (d): median "
                     f"{entry['b_after_d_median_ms']:.3f} ms vs {entry['b_median_ms']:.3f} ms "
                     f"(x{entry['ratio']:.2f}; far from 1 means the machine changed during the run)")
    lines += timing.load_lines(result.get("environment", {}))
    lines += [f"- {reason}" for reason in result.get("skipped", [])]
    return "\n".join(lines) + "\n"


def write(result: dict, name: str = "latency", directory: str | os.PathLike = timing.RESULTS) -> list[Path]:
    """``<name>.json`` and ``<name>.md`` (a header, then ``format_table``), written atomically."""
    model = result.get("model", {})
    header = (f"# Latency: {result.get('bundle')}\n\nModel {model.get('class')} {model.get('config')}, target layer "
              f"`{result.get('target_layer')}`, maps {', '.join(result.get('maps', []))}. {result.get('method', '')}.\n\n")
    return timing.write_results(name, header + format_table(result), result, directory)


# ---------------------------------------------------------------------------------------------- CLI
def parse_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise InputError(f"--batch takes comma-separated integers such as 1,64; got {text!r}") from error
    if not values or min(values) < 1:
        raise InputError(f"--batch takes positive integers, got {text!r}")
    return values


def add_arguments(parser) -> None:
    """``bench BUNDLE [--batch 1,64] [--rounds N] [--threads N] [--engines a,b,c,d] [--peers-python PATH]
    [--out DIR] [--name NAME] [--quiet]``."""
    parser.add_argument("bundle", help="bundle directory written by gradprobe.export")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed calls per engine and batch (default: about POLICIES' budget_s seconds each)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for ORT and torch (default 2)")
    parser.add_argument("--engines", default="a,b,c,d", help="which of the engines a,b,c,d to run (default all)")
    parser.add_argument("--peers-python", default=None,
                        help=f"python of the peers venv for (d) (default ${peers.PEERS_ENV} or .venv-peers/bin/python)")
    parser.add_argument("--out", default=None, help="directory to write NAME.json and NAME.md into")
    parser.add_argument("--name", default="latency", help="file name of the results (default latency)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    result = run_latency(args.bundle, batches=parse_batches(args.batch), rounds=args.rounds, threads=args.threads,
                         peers_python=args.peers_python, progress=not args.quiet, engines=engines)
    print(format_table(result), end="")
    if args.out:
        for path in write(result, args.name, args.out):
            print(f"wrote {path}")
    return 0
