"""Fixtures of the latency benchmarks (pytest-benchmark). Never collected by the default test run.

Run: ``.venv/bin/python -m pytest benchmarks -p no:cacheprovider`` (or ``make bench``). Threads per engine:
$GRADPROBE_BENCH_THREADS (default 2). At the end of the session the ratio table is computed from the
measured stats and written to ``benchmarks/results/core_latency.json`` and ``.md``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import gradprobe  # noqa: E402
from gradprobe import bench  # noqa: E402
from gradprobe.bundle import read_manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = int(os.environ.get("GRADPROBE_BENCH_THREADS", "2"))
_REPORT = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def threads() -> int:
    return THREADS


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory):
    """The shipped ResNet (resnet-fmnist) exported once per session."""
    from gradprobe.models import load_pretrained

    model = load_pretrained("resnet-fmnist")
    path = tmp_path_factory.mktemp("bench") / "resnet-fmnist"
    manifest_like = {"input": {"shape": [None, 1, 28, 28]}}
    example, _ = bench.input_batch(manifest_like, 4)
    return gradprobe.export(model, example, path)


@pytest.fixture(scope="session")
def core_images(core_bundle):
    """batch -> (images, description): the same input batch for every engine."""
    manifest = read_manifest(core_bundle)
    return {batch: bench.input_batch(manifest, batch) for batch in (1, 64)}


@pytest.fixture(scope="session")
def core_engines(core_bundle, tmp_path_factory, threads):
    """(a), (b), (c) built once: ORT sessions with spinning off and pinned threads, torch with the same threads."""
    built, skipped = bench.build_engines(core_bundle, tmp_path_factory.mktemp("engines"), threads)
    return built, skipped


@pytest.fixture(scope="session")
def latency_record(request, core_bundle, core_images, threads):
    """Collects seconds per call per (engine, batch); at session end writes core_latency.json/.md."""
    record = {"times": {}, "skipped": [], "extra": {}}
    busy_before, others = bench.busy_cores(), bench.OtherLoad().start()
    yield record
    other_during = others.stop()
    if not record["times"]:
        return
    rows = [bench.summarize(engine, batch, seconds) for (engine, batch), seconds in sorted(
        record["times"].items(), key=lambda item: (item[0][1], item[0][0]))]
    ratios, targets = bench.compose(rows)
    manifest = read_manifest(core_bundle)
    result = {
        "bundle": "resnet-fmnist (shipped checkpoint, exported in the session)",
        "model": {"class": manifest["model"]["class"], "config": manifest["model"]["config"],
                  "parameters": manifest["model"]["parameters"]},
        "target_layer": manifest["target_layer"]["name"],
        "engines": dict(bench.ENGINES),
        "batches": sorted(core_images),
        "inputs": {str(b): description for b, (_, description) in core_images.items()},
        "environment": {**bench._environment(threads), "busy_cores_before": busy_before,
                        "other_busy_cores_during": other_during},
        "method": ("pytest-benchmark pedantic, one block per engine and batch (not interleaved; "
                   "`gradprobe bench` interleaves); (d) in a peers-venv subprocess after (a)-(c); ORT spinning "
                   f"off, {threads} intra-op threads; torch.set_num_threads({threads}); ratios of medians"),
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
        "drift": [],
        "skipped": record["skipped"],
        **record["extra"],
    }
    bench.write_results(result, RESULTS, name="core_latency")
    request.config.stash[_REPORT] = result


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    result = config.stash.get(_REPORT, None)
    if result is None:
        return
    terminalreporter.section("gradprobe core latency (ratios of medians)")
    terminalreporter.write(bench.format_table(result))
    terminalreporter.write_line(f"written: {RESULTS / 'core_latency.json'} and .md")
