"""Core latency on the shipped ResNet: (a) ORT logits, (b) probe graph, (c) research reference, (d) GradCAM.

Targets on CPU at batch 64 (reported, never asserted: timings are noisy on a shared 2-core machine):
(b)/(a) <= 1.10 and (c)/(b) >= 30. The ratio table is printed at the end and written to
``benchmarks/results/core_latency.{json,md}`` by ``latency_record`` (conftest.py).
"""
from __future__ import annotations

import pytest

from benchmarks import latency
from benchmarks.harness import peers

#: Timed rounds per engine and batch; (c) is far slower than (b), so it gets fewer.
ROUNDS = {1: {"a": 200, "b": 200, "c": 30, "d": 100}, 64: {"a": 50, "b": 50, "c": 10, "d": 50}}
CASES = [(batch, engine) for batch in ROUNDS for engine in ("a", "b", "c")]


@pytest.mark.parametrize(("batch", "engine"), CASES, ids=[f"{e}-batch{b}" for b, e in CASES])
def test_engine(benchmark, core_engines, core_images, latency_record, threads, batch, engine):
    built, skipped = core_engines
    if engine not in built:
        reason = next((s for s in skipped if s.startswith(f"({engine})")), f"({engine}) not built")
        if reason not in latency_record["skipped"]:
            latency_record["skipped"].append(reason)
        pytest.skip(reason)
    images, description = core_images[batch]
    benchmark.group = f"batch {batch}"
    benchmark.extra_info.update(engine=engine, label=latency.ENGINES[engine], batch=batch, threads=threads,
                                inputs=description)
    benchmark.pedantic(built[engine], args=(images,), rounds=ROUNDS[batch][engine],
                       warmup_rounds=latency.POLICIES[engine].warmup, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        latency_record["times"][(engine, batch)] = list(benchmark.stats.stats.data)


@pytest.mark.parametrize("batch", list(ROUNDS))
def test_gradcam_peers(batch, core_bundle, core_images, latency_record, threads, record_property):
    """(d) pytorch-grad-cam GradCAM in the peers venv, after (a)-(c), on the same batch."""
    try:
        peer = latency.gradcam_peer(core_bundle, {batch: core_images[batch][0]}, ROUNDS[batch]["d"], threads)
    except peers.PeersUnavailable as error:
        reason = f"(d) skipped: {error}"
        if reason not in latency_record["skipped"]:
            latency_record["skipped"].append(reason)
        pytest.skip(reason)
    seconds = peer["batches"][str(batch)]
    latency_record["times"][("d", batch)] = seconds
    summary = latency.row("d", batch, seconds)
    record_property(f"gradcam_batch{batch}_median_ms", summary["median_ms"])
    record_property(f"gradcam_batch{batch}_p90_ms", summary["p90_ms"])
    latency_record["extra"]["peers"] = {k: v for k, v in peer.items() if k != "batches"}
