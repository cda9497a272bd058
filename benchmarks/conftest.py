"""Fixtures of the latency benchmarks (pytest-benchmark). Never collected by the default test run.

Run: ``.venv/bin/python -m pytest benchmarks -p no:cacheprovider`` (or ``make bench``). Threads per engine:
$GRADPROBE_BENCH_THREADS (default 2). At the end of the session the ratio table is composed from the
measured stats (``benchmarks.latency``) and written to ``benchmarks/results/core_latency.json`` and ``.md``.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import gradprobe  # noqa: E402
from gradprobe.base.bundle import Bundle  # noqa: E402

from benchmarks import latency  # noqa: E402
from benchmarks.harness import timing  # noqa: E402

THREADS = int(os.environ.get("GRADPROBE_BENCH_THREADS", "2"))
BATCHES = (1, 64)
_REPORT = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def threads() -> int:
    return THREADS


@pytest.fixture(scope="session")
def core_bundle(tmp_path_factory):
    """The shipped ResNet (resnet-fmnist) exported once per session."""
    from gradprobe.data import fashion_mnist
    from gradprobe.models import load_pretrained

    path = tmp_path_factory.mktemp("bench") / "resnet-fmnist"
    return gradprobe.export(load_pretrained("resnet-fmnist"), fashion_mnist("test")[0][:4], path)


@pytest.fixture(scope="session")
def core_images(core_bundle):
    """batch -> (images, description): the same input batch for every engine."""
    manifest = Bundle.open(core_bundle).manifest
    return {batch: latency.input_batch(manifest, batch) for batch in BATCHES}


@pytest.fixture(scope="session")
def core_engines(core_bundle, threads):
    """(a), (b), (c) built once: ORT backends with spinning off and pinned threads, torch with the same threads."""
    return latency.build_engines(core_bundle, threads)


@pytest.fixture(scope="session")
def latency_record(request, core_bundle, core_images, threads):
    """Collects seconds per call per (engine, batch); at session end writes core_latency.json/.md."""
    record = {"times": {}, "skipped": [], "extra": {}}
    with timing.load_watch() as load:
        yield record
    if not record["times"]:
        return
    rows = [latency.row(engine, batch, seconds) for (engine, batch), seconds in sorted(
        record["times"].items(), key=lambda item: (item[0][1], item[0][0]))]
    ratios, targets = latency.compose(rows)
    manifest = Bundle.open(core_bundle).manifest
    result = {
        "bundle": "resnet-fmnist (shipped checkpoint, exported in the session)",
        "model": {"class": manifest.model.class_name, "config": manifest.model.config,
                  "parameters": manifest.model.parameters},
        "target_layer": manifest.classifier.target_layer,
        "maps": [spec.name for spec in manifest.classifier.maps],
        "engines": dict(latency.ENGINES),
        "batches": list(BATCHES),
        "inputs": {str(b): description for b, (_, description) in core_images.items()},
        "environment": {**timing.environment(threads), **load},
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
    latency.write(result, "core_latency")
    request.config.stash[_REPORT] = result


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    result = config.stash.get(_REPORT, None)
    if result is None:
        return
    terminalreporter.section("gradprobe core latency (ratios of medians)")
    terminalreporter.write(latency.format_table(result))
    terminalreporter.write_line(f"written: {timing.RESULTS / 'core_latency.json'} and .md")
