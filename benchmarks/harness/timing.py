"""The one timing module of the benchmarks: warm-up, interleaved rounds, summaries, ratios, load checks, results.

Rules every benchmark follows (the feasibility notes measured what breaks without them):
- engines that are compared are timed interleaved round-robin in one run (``time_interleaved``), so
  drifts of a shared machine hit all of them alike; an engine with fewer rounds is spread evenly over
  the run (``spread_schedule``), not bunched at one end;
- every ONNX Runtime backend runs with spinning off and a pinned thread count (pools that spin fight
  over the cores and inflate each other's times), torch with the same thread count;
- medians and p90 are reported, and a ratio is the quotient of two medians of the same run;
- each run records whether other processes used the CPUs meanwhile (``load_watch``): a number taken on
  a busy machine says so in its table.

Imports numpy only (and gradprobe's file I/O when writing), so the peers venv can time with it too.
"""
from __future__ import annotations

import contextlib
import json
import operator
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

#: Where the checked-in result tables live.
RESULTS = Path(__file__).resolve().parents[1] / "results"
#: Average cores other processes may use during a run before its numbers are called skewed.
QUIET_CORES = 0.2


# ------------------------------------------------------------------------------------------ rounds
@dataclass(frozen=True)
class RoundsPolicy:
    """Calls per engine: ``warmup`` untimed, then about ``budget_s`` seconds of timed calls (judged from
    the last warm-up call), clamped to [``min_rounds``, ``max_rounds``] so slow engines still get a median."""

    budget_s: float
    min_rounds: int
    max_rounds: int
    warmup: int = 1

    def rounds(self, seconds_per_call: float) -> int:
        wanted = int(self.budget_s / max(seconds_per_call, 1e-6))
        return max(self.min_rounds, min(self.max_rounds, wanted))


def spread_schedule(rounds: Mapping[str, int]) -> list[str]:
    """The order of timed calls: round-robin, an engine with fewer rounds spread evenly over the whole run.

    Each slot visits the engines in a rotated order, so no engine always runs right after the same other.
    """
    total = max(rounds.values(), default=0)
    names, order = list(rounds), []
    for slot in range(total):
        shift = slot % len(names)
        for name in names[shift:] + names[:shift]:
            count = rounds[name]
            if (slot + 1) * count // total > slot * count // total:  # Bresenham: count hits over total slots
                order.append(name)
    return order


def time_interleaved(engines: Mapping[str, Callable], feeds, policies: Mapping[str, RoundsPolicy],
                     rounds: Mapping[str, int] | None = None, progress=None) -> dict[str, list[float]]:
    """Warm every engine up, then time single calls in ``spread_schedule`` order: seconds per call per engine.

    ``rounds``: fixed timed calls per engine; None (or an engine missing from it) lets the engine's
    policy choose from its last warm-up call. ``progress``: a tqdm bar, advanced per call.
    """
    last = {}
    for name, call in engines.items():
        for _ in range(max(1, policies[name].warmup)):
            start = time.perf_counter()
            call(feeds)
            last[name] = time.perf_counter() - start
            if progress is not None:
                progress.update(1)
    counts = {name: int((rounds or {}).get(name) or policies[name].rounds(last[name])) for name in engines}
    if min(counts.values(), default=1) < 1:
        raise ValueError(f"rounds must be positive, got {counts}")
    if progress is not None:
        progress.total = progress.n + sum(counts.values())
        progress.refresh()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for name in spread_schedule(counts):
        start = time.perf_counter()
        engines[name](feeds)
        times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress.update(1)
    return times


# --------------------------------------------------------------------------------------- summaries
def summarize(seconds: Sequence[float]) -> dict:
    """n, median, p90, mean and min of one engine's calls, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no timed calls to summarize")
    return {"n": int(ms.size), "median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    """A bound on one ratio, checked where ``where`` matches (e.g. ``{"batch": 64}``)."""

    ratio: str
    comparison: str
    bound: float
    where: dict = field(default_factory=dict)   # which ratio entry the target is about

    def check(self, entries: Iterable[dict]) -> dict:
        where = self.where
        entry = next((e for e in entries if all(e.get(k) == v for k, v in where.items())), {})
        value = entry.get(self.ratio)
        place = ", ".join(f"{k} {v}" for k, v in where.items())
        if value is None:
            holds, note = None, f"not measured (needs {self.ratio}{' at ' + place if place else ''})"
        else:
            holds = bool(_COMPARE[self.comparison](value, self.bound))
            note = f"{self.ratio} = {value:.3f} {'holds' if holds else 'does NOT hold'} ({self.comparison} {self.bound})"
        return {"ratio": self.ratio, **where, "comparison": self.comparison, "bound": self.bound, "value": value,
                "holds": holds, "note": note}


def compose_ratios(rows: Sequence[dict], pairs: Sequence[tuple[str, str, str]],
                   group: Sequence[str] = ("batch",)) -> list[dict]:
    """Per group of rows (same values of ``group`` keys): ``{group..., name: median(top) / median(bottom)}``
    for each ``(name, top, bottom)`` of engines, None where either engine was not measured."""
    medians = {(tuple(r[k] for k in group), r["engine"]): r["median_ms"] for r in rows}
    entries = []
    for key in sorted({tuple(r[k] for k in group) for r in rows}):
        entry = dict(zip(group, key))
        for name, top, bottom in pairs:
            if (key, top) in medians and (key, bottom) in medians:
                entry[name] = medians[(key, top)] / medians[(key, bottom)]
            else:
                entry[name] = None
        entries.append(entry)
    return entries


def check_targets(targets: Sequence[Target], entries: Sequence[dict]) -> list[dict]:
    return [target.check(entries) for target in targets]


def target_lines(checked: Sequence[dict]) -> list[str]:
    """Markdown bullets, one per checked target."""
    lines = []
    for target in checked:
        mark = {True: "HOLDS", False: "DOES NOT HOLD", None: "NOT MEASURED"}[target["holds"]]
        place = "".join(f" at {k} {target[k]}" for k in ("model", "batch") if k in target)
        measured = "" if target["value"] is None else f" (measured {target['value']:.3f})"
        lines.append(f"- target ({target['ratio']}) {target['comparison']} {target['bound']}{place}: **{mark}**"
                     f"{measured}")
    return lines


# ---------------------------------------------------------------------------------------- CPU load
def _proc_stat() -> list[int]:
    with open("/proc/stat", encoding="ascii") as handle:
        return [int(v) for v in handle.readline().split()[1:]]


def busy_cores(interval: float = 1.0) -> float | None:
    """CPU cores busy over the next ``interval`` seconds (None off Linux): other work skews timings."""
    try:
        first = _proc_stat()
        time.sleep(interval)
        second = _proc_stat()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(second) - sum(first)
    idle = (second[3] + second[4]) - (first[3] + first[4])  # idle + iowait
    if total <= 0:
        return None
    return round((1 - idle / total) * (os.cpu_count() or 1), 2)


class OtherLoad:
    """Average CPU cores used by *other* processes between ``start()`` and ``stop()`` (Linux; else None).

    System-wide busy time from /proc/stat minus this process's and its waited-for children's CPU time,
    so the benchmark's own work (and the peers subprocess it waits for) does not count.
    """

    def __init__(self):
        self._start = None

    @staticmethod
    def _sample():
        values = _proc_stat()
        busy = (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # user..steal - idle - iowait
        own = os.times()
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


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def load_watch(settle_s: float = 1.0):
    """Yield a dict that holds, after the block, how loaded the machine was before and during it."""
    record = {"load_average_before": load_average(), "busy_cores_before": busy_cores(settle_s)}
    others = OtherLoad().start()
    try:
        yield record
    finally:
        record.update(other_busy_cores_during=others.stop(), load_average_after=load_average())


def load_lines(environment: Mapping) -> list[str]:
    """Markdown bullets on the load a run met: every table states whether its machine was quiet."""
    lines = []
    before = environment.get("busy_cores_before")
    if before is not None and before > 0.3:
        lines.append(f"- WARNING: {before} CPU cores were busy with other work just before the run; "
                     "the times (and ratios) may be skewed — rerun on a quiet machine")
    during = environment.get("other_busy_cores_during")
    if during is not None:
        verdict = ("WARNING: other processes competed for the CPUs; the times (and ratios) are skewed — rerun on "
                   "a quiet machine" if during > QUIET_CORES else "a clean run")
        lines.append(f"- other processes used {during} CPU cores on average during the run: {verdict}")
    return lines


# ------------------------------------------------------------------------------------ environment
def versions(*distributions: str) -> dict:
    """Installed versions (None when missing), read from package metadata: importing torch would cost seconds."""
    found = {}
    for name in distributions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(threads: int, **extra) -> dict:
    """Where and with what a run measured: Python, platform, cores, threads, library versions."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "threads": threads, "ort_spinning": False, "numpy": np.__version__,
            **versions("onnxruntime", "onnx", "torch", "gradprobe"), **extra}


# ----------------------------------------------------------------------------------------- results
def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_results(name: str, markdown: str, payload: dict | None = None,
                  directory: str | os.PathLike = RESULTS) -> list[Path]:
    """Write ``<name>.md`` (and ``<name>.json`` when ``payload`` is given) atomically; returns the paths."""
    from gradprobe.base.fileio import atomic_write_text

    directory = Path(directory)
    written = []
    if payload is not None:
        written.append(atomic_write_text(directory / f"{name}.json",
                                         json.dumps(payload, indent=2, default=_plain) + "\n"))
    written.append(atomic_write_text(directory / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n"))
    return written


def add_output_arguments(parser, name: str | None = None) -> None:
    """``--out DIR`` (default: the checkout's results folder) and, given a default ``name``, ``--name NAME``."""
    if name is not None:
        parser.add_argument("--name", default=name, help=f"file name of the results (default {name})")
    parser.add_argument("--out", default=str(RESULTS), help=f"folder for the results (default {RESULTS})")


def publish(name: str, markdown: str, payload: dict | None = None, directory: str | os.PathLike = RESULTS) -> None:
    """Print the table, write it (and the data) with ``write_results``, and say where."""
    print(markdown, end="" if markdown.endswith("\n") else "\n")
    for path in write_results(name, markdown, payload, directory):
        print(f"wrote {path}")
