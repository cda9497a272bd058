"""Side-by-side CPU latency of four engines on the same model and the same input batch.

- **(a)** ONNX Runtime, logits only: the ``logits`` subgraph extracted from the bundle's ``probe.onnx``
  with ``onnx.utils.Extractor``, so its forward ops are exactly those of (b).
- **(b)** ONNX Runtime, the probe graph with every output (logits, gradient norms, the three maps).
- **(c)** the research-style eager reference (``gradprobe.export.reference.ResearchReference``): per
  sample, a forward, then one autograd backward per label and per map. Needs the bundle's
  ``model.safetensors`` and torch.
- **(d)** pytorch-grad-cam ``GradCAM`` (``targets=None``: the predicted class) on the bundle's target
  layer, for the whole batch. It needs torchvision, so it runs in the peers venv (``make peers``) as a
  subprocess (``benchmarks/peers/gradcam_timing.py``) right after (a)-(c), in the same run.

Timing rules (see the feasibility notes): every ORT session has intra-op spinning off and a pinned thread
count, torch uses the same thread count, and (a) and (b) are timed interleaved round-robin, then (c), in one
process after a warm-up, so drifts of the machine hit all engines alike. Medians and p90 are reported,
and the ratios (b)/(a), (c)/(b), (d)/(b) come from the medians of this one run.

This module imports neither torch nor onnxruntime at import time.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .bundle import PROBE, read_manifest
from .errors import InputError
from .fileio import atomic_write_text

ENGINES = {
    "a": "ORT logits only",
    "b": "ORT probe graph, all outputs",
    "c": "research reference (eager, per sample)",
    "d": "pytorch-grad-cam GradCAM (batched)",
}
RATIOS = (("b/a", "b", "a"), ("c/b", "c", "b"), ("d/b", "d", "b"))
#: Targets on CPU at batch 64 on the shipped ResNet: (ratio, comparison, bound).
TARGETS = (("b/a", "<=", 1.10), ("c/b", ">=", 30.0))
TARGET_BATCH = 64
PEERS_ENV = "GRADPROBE_PEERS_PYTHON"
PEERS_SCRIPT = Path("benchmarks") / "peers" / "gradcam_timing.py"


# --------------------------------------------------------------------------------------------- inputs
def input_batch(manifest: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The first ``batch`` Fashion-MNIST test images when the bundle takes [1, 28, 28], else seeded uniform noise."""
    shape = tuple(manifest["input"]["shape"][1:])
    if shape == (1, 28, 28):
        try:
            from .data import fashion_mnist

            images, _ = fashion_mnist("test")
            if len(images) >= batch:
                return np.ascontiguousarray(images[:batch]), f"Fashion-MNIST test[:{batch}]"
        except Exception:  # no local data set: fall back to noise, and say so
            pass
    rng = np.random.default_rng(seed)
    return rng.random((batch, *shape), dtype=np.float32), f"uniform noise, seed {seed}"


# -------------------------------------------------------------------------------------------- engines
def logits_only_model(probe_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Extract the ``images -> logits`` subgraph of the probe graph (identical forward ops) into ``out_path``."""
    import onnx
    import onnx.utils

    model = onnx.load(str(probe_path))
    extracted = onnx.utils.Extractor(model).extract_model(["images"], ["logits"])
    onnx.save(extracted, str(out_path))
    return Path(out_path)


def _ort_session(path, threads: int):
    import onnxruntime as ort

    from gradprobe.runtime.ort import session_options

    options = session_options(threads=threads, spinning=False)  # spinning off: pools must not fight
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_engines(bundle: str | os.PathLike, workdir: str | os.PathLike, threads: int = 2,
                  engines=("a", "b", "c")) -> tuple[dict, list[str]]:
    """``({name: fn(images) -> outputs}, skipped reasons)`` for the in-process engines among (a), (b), (c)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    built, skipped = {}, []
    if "a" in engines:
        session_a = _ort_session(logits_only_model(bundle / PROBE, Path(workdir) / "logits.onnx"), threads)
        if [o.name for o in session_a.get_outputs()] != ["logits"]:
            raise InputError("the extracted logits-only graph does not have exactly the output 'logits'")
        built["a"] = lambda x: session_a.run(["logits"], {"images": x})
    if "b" in engines:
        session_b = _ort_session(bundle / PROBE, threads)
        names_b = [o.name for o in session_b.get_outputs()]

        def run_b(x):
            contrast = np.full(len(x), -1, dtype=np.int64)  # -1: runner-up, as Probe.run(contrast=None)
            return session_b.run(names_b, {"images": x, "contrast": contrast})

        built["b"] = run_b
    if "c" in engines:
        reason = _reference_unavailable(manifest)
        if reason:
            skipped.append(f"(c) skipped: {reason}")
        else:
            built["c"] = _reference_engine(bundle, manifest, threads)
    return built, skipped


def _reference_unavailable(manifest: dict) -> str | None:
    if not manifest.get("model", {}).get("weights"):
        return "bundle has no model weights (model.safetensors); export a gradprobe reference model"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed: pip install 'gradprobe[export]'"
    return None


def _reference_engine(bundle: Path, manifest: dict, threads: int):
    import torch

    from gradprobe.export.reference import ResearchReference
    from gradprobe.models import load_checkpoint

    torch.set_num_threads(threads)
    model = load_checkpoint(bundle / manifest["model"]["weights"])
    reference = ResearchReference.for_bundle(model, manifest)  # the bundle's target, head and normalisation
    return lambda x: reference.run(x, None)


# --------------------------------------------------------------------------------------------- timing
def spread_schedule(rounds: dict[str, int]) -> list[str]:
    """Round-robin order in which an engine with fewer rounds is spread evenly over the whole run.

    Each slot visits the engines in a rotated order so no engine always runs first after another.
    """
    total = max(rounds.values(), default=0)
    order, names = [], list(rounds)
    for slot in range(total):
        rotated = names[slot % len(names):] + names[:slot % len(names)] if names else []
        for name in rotated:
            n = rounds[name]
            if (slot + 1) * n // total > slot * n // total:  # Bresenham: n hits spread over total slots
                order.append(name)
    return order


#: Default rounds policy (``rounds=None``): after the warm-up, each engine gets about ``BUDGET_S`` seconds
#: of timed calls per batch, clamped to [MIN_ROUNDS, MAX_ROUNDS]. Fixed rounds when ``rounds`` is given.
BUDGET_S = {"a": 3.0, "b": 3.0, "c": 8.0, "d": 5.0}
MIN_ROUNDS = {"a": 20, "b": 20, "c": 5, "d": 10}
MAX_ROUNDS = {"a": 200, "b": 200, "c": 30, "d": 100}
WARMUP = {"a": 5, "b": 5, "c": 1, "d": 3}


def budget_rounds(name: str, seconds_per_call: float) -> int:
    """Rounds for ``name`` under the default policy, given one warm call's duration."""
    wanted = int(BUDGET_S[name] / max(seconds_per_call, 1e-6))
    return max(MIN_ROUNDS[name], min(MAX_ROUNDS[name], wanted))


def time_interleaved(engines: dict, feeds, rounds: dict[str, int] | None, warmup: dict[str, int],
                     progress=None) -> dict[str, list[float]]:
    """Warm every engine up, then time single calls round-robin; returns seconds per call per engine.

    ``rounds`` None: chosen per engine from its last warm-up call (``budget_rounds``).
    """
    last = {}
    for name, fn in engines.items():
        for _ in range(max(1, warmup.get(name, 1))):
            start = time.perf_counter()
            fn(feeds)
            last[name] = time.perf_counter() - start
            if progress is not None:
                progress.update(1)
    if rounds is None:
        rounds = {name: budget_rounds(name, last[name]) for name in engines}
    if progress is not None:
        progress.total = progress.n + sum(rounds[n] for n in engines)
        progress.refresh()
    times = {name: [] for name in engines}
    for name in spread_schedule({n: rounds[n] for n in engines}):
        start = time.perf_counter()
        engines[name](feeds)
        times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return times


def summarize(engine: str, batch: int, seconds) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {"engine": engine, "label": ENGINES[engine], "batch": int(batch), "n": int(ms.size),
            "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def _fixed_rounds(rounds) -> dict[str, int] | None:
    if rounds is None:
        return None
    if isinstance(rounds, bool) or not isinstance(rounds, (int, dict)):
        raise InputError(f"rounds must be None, an int or a dict engine -> int, got {rounds!r}")
    fixed = {name: rounds for name in ENGINES} if isinstance(rounds, int) else {
        name: int(rounds.get(name, MIN_ROUNDS[name])) for name in ENGINES}
    if min(fixed.values()) < 1:
        raise InputError(f"rounds must be positive, got {rounds!r}")
    return fixed


def compose(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Ratios of medians per batch and the target checks, from the summary rows."""
    medians = {(r["batch"], r["engine"]): r["median_ms"] for r in rows}
    ratios = []
    for batch in sorted({r["batch"] for r in rows}):
        entry = {"batch": batch}
        for key, top, bottom in RATIOS:
            if (batch, top) in medians and (batch, bottom) in medians:
                entry[key] = medians[(batch, top)] / medians[(batch, bottom)]
            else:
                entry[key] = None
        ratios.append(entry)
    by_batch = {r["batch"]: r for r in ratios}
    targets = []
    for key, comparison, bound in TARGETS:
        value = by_batch.get(TARGET_BATCH, {}).get(key)
        if value is None:
            holds, note = None, f"not measured (needs {key} at batch {TARGET_BATCH})"
        else:
            holds = value <= bound if comparison == "<=" else value >= bound
            note = f"{key} = {value:.3f} {'holds' if holds else 'does NOT hold'} ({comparison} {bound})"
        targets.append({"ratio": key, "batch": TARGET_BATCH, "comparison": comparison, "bound": bound,
                        "value": value, "holds": holds, "note": note})
    return ratios, targets


# ----------------------------------------------------------------------------------------- peers (d)
def find_peers_python(peers_python=None, root=None) -> tuple[Path | None, str]:
    """``(python, where)``: ``peers_python`` if given, else $GRADPROBE_PEERS_PYTHON, else
    ROOT/.venv-peers/bin/python with ``root`` defaulting to the current folder.

    An explicit path or environment value that does not exist gives ``(None, why)``; no silent fallback.
    """
    if peers_python:
        path = Path(peers_python)
        return (path, "--peers-python") if path.exists() else (None, f"peers python {path} does not exist")
    if os.environ.get(PEERS_ENV):
        path = Path(os.environ[PEERS_ENV])
        return (path, PEERS_ENV) if path.exists() else (None, f"${PEERS_ENV}={path} does not exist")
    root = Path(root) if root is not None else Path.cwd()
    path = root / ".venv-peers" / "bin" / "python"
    if path.exists():
        return path, ".venv-peers"
    return None, f"peers venv .venv-peers not found in {root} — run `make peers`"


def find_peers_script() -> Path | None:
    here = Path(__file__).resolve().parent  # sdk/ in a source checkout
    for root in (Path.cwd(), here.parent):
        if (root / PEERS_SCRIPT).exists():
            return root / PEERS_SCRIPT
    return None


def run_gradcam_peer(peers_python, bundle, batches: dict[int, np.ndarray], rounds=None,
                     warmup: int = WARMUP["d"], threads: int = 2, timeout: float = 900) -> dict:
    """Run (d) in the peers venv; returns the script's JSON ({"batches": {"B": [seconds, ...]}, ...}).

    ``rounds``: an int, a dict batch -> int, or None: the default policy (``budget_rounds``) applied in the
    subprocess after its warm-up.
    """
    bundle = Path(bundle).resolve()
    manifest = read_manifest(bundle)
    script = find_peers_script()
    if script is None:
        raise FileNotFoundError(f"{PEERS_SCRIPT} not found (run from the gradprobe source checkout)")
    with tempfile.TemporaryDirectory(prefix="gradprobe-bench-") as folder:
        spec = {"checkpoint": str(bundle / manifest["model"]["weights"]),
                "target_layer": manifest["target_layer"]["name"],
                "normalize": manifest["input"].get("normalize"),
                "threads": threads, "warmup": warmup, "batches": [],
                "budget_s": BUDGET_S["d"], "min_rounds": MIN_ROUNDS["d"], "max_rounds": MAX_ROUNDS["d"]}
        for batch, images in batches.items():
            path = Path(folder) / f"batch{batch}.npy"
            np.save(path, images)
            count = rounds.get(batch) if isinstance(rounds, dict) else rounds
            spec["batches"].append({"batch": int(batch), "images": str(path),
                                    "rounds": None if count is None else int(count)})
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
        completed = subprocess.run([str(peers_python), str(script), str(spec_path)], capture_output=True,
                                   text=True, timeout=timeout, env=env)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"exit {completed.returncode}: " + " | ".join(tail))
    lines = [line for line in completed.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON on stdout: {completed.stdout[-300:]!r}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- main
def _environment(threads: int) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "threads": threads, "ort_spinning": False, "numpy": np.__version__}
    for module in ("onnxruntime", "onnx", "torch"):
        try:
            env[module] = __import__(module).__version__
        except ImportError:
            env[module] = None
    return env


def busy_cores(interval: float = 1.0) -> float | None:
    """CPU cores busy over ``interval`` seconds, from /proc/stat (None off Linux): other work skews timings."""
    def sample():
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


class OtherLoad:
    """Average CPU cores used by *other* processes between ``start()`` and ``stop()`` (Linux; else None).

    System-wide busy time from /proc/stat minus this process's and its waited-for children's CPU time:
    a run during which other work took a core is not a clean measurement, and the report says so.
    """

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        with open("/proc/stat", encoding="ascii") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        ticks = os.sysconf("SC_CLK_TCK")
        own = os.times()
        busy = (sum(values[:8]) - values[3] - values[4]) / ticks  # user..steal minus idle and iowait
        return time.monotonic(), busy, own.user + own.system + own.children_user + own.children_system

    def start(self) -> "OtherLoad":
        try:
            self._start = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            self._start = None
        return self

    def stop(self) -> float | None:
        if self._start is None:
            return None
        try:
            wall1, busy1, own1 = self._sample()
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        wall0, busy0, own0 = self._start
        if wall1 <= wall0:
            return None
        return round(max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)), 2)


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_latency(bundle: str | os.PathLike, batches=(1, 64), rounds=None, threads: int = 2,
                peers_python=None, progress: bool = True, engines=("a", "b", "c", "d")) -> dict:
    """Time engines (a)-(d) on ``bundle`` at each batch size; see the module docstring.

    ``rounds``: None (per engine about ``BUDGET_S`` seconds after warm-up, within [MIN_ROUNDS, MAX_ROUNDS]),
    an int for every engine, or a dict engine -> int. ``peers_python``: the peers venv's python for (d)
    (default: $GRADPROBE_PEERS_PYTHON or ./.venv-peers/bin/python). Returns a dict with ``rows`` (engine,
    batch, median_ms, p90_ms, n ...), ``ratios`` (b/a, c/b, d/b per batch, from the medians), ``targets``,
    ``skipped`` (reasons) and ``drift`` ((b) timed again after (d): a check that the machine stayed the same).
    """
    from tqdm.auto import tqdm

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    try:
        batches = sorted({int(b) for b in batches})
    except (TypeError, ValueError) as error:
        raise InputError(f"batches must be positive integers, got {batches!r}") from error
    if not batches or batches[0] < 1:
        raise InputError(f"batches must be positive integers, got {batches}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise InputError(f"unknown engines {unknown}; expected some of {list(ENGINES)}")
    fixed = _fixed_rounds(rounds)
    skipped, rows, inputs, drift = [], [], {}, []
    load_before, busy_before = _load(), busy_cores()
    others = OtherLoad().start()
    images = {}
    for b in batches:
        images[b], inputs[b] = input_batch(manifest, b)

    with tempfile.TemporaryDirectory(prefix="gradprobe-bench-") as workdir:
        built, reasons = build_engines(bundle, workdir, threads, [e for e in engines if e in "abc"])
        skipped += reasons
        # (a) and (b) alternate call by call: their ratio is the tight one. (c) follows in the same process:
        # interleaved, each multi-second eager torch call left ORT's caches and threads cold (b/a read 1.19).
        blocks = [{k: fn for k, fn in built.items() if k in "ab"}, {k: fn for k, fn in built.items() if k == "c"}]
        with tqdm(total=None, desc="(a,b) interleaved, then (c)", unit="call", disable=not progress,
                  leave=False, file=sys.stderr) as bar:
            for b in batches:
                bar.set_postfix(batch=b)
                for block in (blk for blk in blocks if blk):
                    times = time_interleaved(block, images[b], fixed, WARMUP, progress=bar)
                    rows += [summarize(name, b, times[name]) for name in block]

        if "d" in engines:
            reason = None
            python, where = find_peers_python(peers_python)
            if not manifest.get("model", {}).get("weights"):
                reason = "(d) skipped: bundle has no model weights (model.safetensors) for GradCAM to load"
            elif python is None:
                reason = f"(d) skipped: {where} (or set ${PEERS_ENV} / --peers-python)"
            if reason:
                skipped.append(reason)
            else:
                with tqdm(total=1, desc="(d) GradCAM in the peers venv", disable=not progress, leave=False,
                          file=sys.stderr) as bar:
                    try:
                        peer = run_gradcam_peer(python, bundle, images, None if fixed is None else fixed["d"],
                                                WARMUP["d"], threads)
                        for b in batches:
                            rows.append(summarize("d", b, peer["batches"][str(b)]))
                        inputs["peers"] = {k: v for k, v in peer.items() if k != "batches"}
                    except Exception as error:  # report, never fake: (d) is absent and says why
                        skipped.append(f"(d) failed in {python}: {str(error)[:600]}")
                    bar.update(1)
                if "b" in built and any(r["engine"] == "d" for r in rows):
                    # (b) again right after (d): if the machine changed meanwhile, (d)/(b) is suspect
                    medians = {r["batch"]: r["median_ms"] for r in rows if r["engine"] == "b"}
                    for b in batches:
                        again = summarize("b", b, time_interleaved({"b": built["b"]}, images[b],
                                                                   {"b": MIN_ROUNDS["b"]}, {"b": 1})["b"])
                        drift.append({"batch": b, "b_median_ms": medians[b], "b_after_d_median_ms":
                                      again["median_ms"], "ratio": again["median_ms"] / medians[b]})
        del built  # release the sessions and the torch model

    ratios, targets = compose(rows)
    return {
        "bundle": str(bundle),
        "model": {"class": manifest["model"].get("class"), "config": manifest["model"].get("config"),
                  "parameters": manifest["model"].get("parameters")},
        "target_layer": manifest["target_layer"]["name"],
        "engines": {k: ENGINES[k] for k in engines},
        "batches": batches,
        "inputs": {str(k): v for k, v in inputs.items()},
        "rounds": "default policy" if fixed is None else fixed,
        "rounds_policy": {"budget_s": BUDGET_S, "min": MIN_ROUNDS, "max": MAX_ROUNDS},
        "warmup": WARMUP,
        "environment": {**_environment(threads), "load_average_before": load_before, "load_average_after": _load(),
                        "busy_cores_before": busy_before, "other_busy_cores_during": others.stop()},
        "method": ("(a),(b) timed interleaved round-robin after warm-up (single calls, perf_counter), then (c) in "
                   "the same process; (d) in a peers-venv subprocess right after; ORT spinning off, "
                   f"{threads} intra-op threads; torch.set_num_threads({threads}); ratios of medians"),
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "drift": drift,
        "skipped": skipped,
    }


# -------------------------------------------------------------------------------------------- report
def _fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def format_table(result: dict) -> str:
    """Markdown: medians / p90 per engine and batch, then the ratio table and the target checks."""
    batches = result.get("batches") or sorted({r["batch"] for r in result["rows"]})
    cells = {(r["engine"], r["batch"]): r for r in result["rows"]}
    lines = ["| engine | " + " | ".join(f"batch {b}: median ms | p90 ms | n" for b in batches) + " |",
             "|---|" + "---|---|---|" * len(batches)]
    for engine, label in result["engines"].items():
        parts = []
        for b in batches:
            row = cells.get((engine, b))
            parts.append("— | — | 0" if row is None else
                         f"{row['median_ms']:.3f} | {row['p90_ms']:.3f} | {row['n']}")
        lines.append(f"| ({engine}) {label} | " + " | ".join(parts) + " |")
    lines += ["", "| batch | (b)/(a) | (c)/(b) | (d)/(b) |", "|---|---|---|---|"]
    for entry in result["ratios"]:
        lines.append(f"| {entry['batch']} | {_fmt(entry['b/a'], 3)} | {_fmt(entry['c/b'], 1)} | "
                     f"{_fmt(entry['d/b'], 2)} |")
    lines.append("")
    for target in result["targets"]:
        mark = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT MEASURED"}[target["holds"]]
        lines.append(f"- target ({target['ratio']}) {target['comparison']} {target['bound']} at batch "
                     f"{target['batch']}: **{mark}**" +
                     ("" if target["value"] is None else f" (measured {target['value']:.3f})"))
    for entry in result.get("drift", []):
        lines.append(f"- check: (b) at batch {entry['batch']} re-timed after (d): median "
                     f"{entry['b_after_d_median_ms']:.3f} ms vs {entry['b_median_ms']:.3f} ms "
                     f"(x{entry['ratio']:.2f}; far from 1 means the machine changed during the run)")
    load = result.get("environment", {})
    busy = load.get("busy_cores_before")
    if busy is not None and busy > 0.3:
        lines.append(f"- WARNING: {busy} CPU cores were busy with other work just before the run; "
                     "the times (and ratios) may be skewed — rerun on a quiet machine")
    during = load.get("other_busy_cores_during")
    if during is not None:
        verdict = ("WARNING: other processes competed for the CPUs; the times (and ratios) are skewed — "
                   "rerun on a quiet machine" if during > 0.2 else "a clean run")
        lines.append(f"- other processes used {during} CPU cores on average during the run: {verdict}")
    for reason in result.get("skipped", []):
        lines.append(f"- {reason}")
    return "\n".join(lines) + "\n"


def write_results(result: dict, directory: str | os.PathLike, name: str = "latency") -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``directory`` atomically; returns both paths."""
    directory = Path(directory)
    config = result.get("model", {}).get("config")
    header = (f"# Latency: {result.get('bundle')}\n\nModel {result.get('model', {}).get('class')} {config}, "
              f"target layer `{result.get('target_layer')}`. {result.get('method', '')}.\n\n")
    json_path = atomic_write_text(directory / f"{name}.json", json.dumps(result, indent=2) + "\n")
    md_path = atomic_write_text(directory / f"{name}.md", header + format_table(result))
    return json_path, md_path


# ----------------------------------------------------------------------------------------------- CLI
def _parse_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise InputError(f"--batch takes comma-separated integers such as 1,64; got {text!r}") from error
    if not values or min(values) < 1:
        raise InputError(f"--batch takes positive integers, got {text!r}")
    return values


def _bench_command(args) -> int:
    result = run_latency(args.bundle, batches=_parse_batches(args.batch), rounds=args.rounds,
                         threads=args.threads, peers_python=args.peers_python, progress=not args.quiet)
    print(format_table(result), end="")
    if args.out:
        for path in write_results(result, args.out):
            print(f"wrote {path}")
    return 0


def add_bench_command(subparsers) -> None:
    """Register ``gradprobe bench BUNDLE --batch 1,64 [--rounds N] [--threads N] [--peers-python PATH] [--out DIR]``."""
    bench = subparsers.add_parser("bench", help="latency of ORT logits vs probe graph vs eager reference vs GradCAM",
                                  description=__doc__.split("\n\n")[0])
    bench.add_argument("bundle", help="bundle directory written by gradprobe.export")
    bench.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    bench.add_argument("--rounds", type=int, default=None,
                       help="timed calls per engine and batch (default: about gradprobe.bench.BUDGET_S seconds each)")
    bench.add_argument("--threads", type=int, default=2, help="intra-op threads for ORT and torch (default 2)")
    bench.add_argument("--peers-python", default=None,
                       help=f"python of the peers venv for GradCAM (default ${PEERS_ENV} or .venv-peers/bin/python)")
    bench.add_argument("--out", default=None, help="directory to write latency.json and latency.md into")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_bench_command)


__all__ = ["ENGINES", "run_latency", "format_table", "write_results", "add_bench_command", "build_engines",
           "logits_only_model", "time_interleaved", "spread_schedule", "summarize", "compose",
           "find_peers_python", "run_gradcam_peer", "OtherLoad", "busy_cores", "budget_rounds", "BUDGET_S", "MIN_ROUNDS", "MAX_ROUNDS",
           "WARMUP"]
