"""Core latency on the shipped ResNet: (a) ORT logits, (b) ORT probe graph, (c) research reference, (d) GradCAM.

Targets on CPU at batch 64 (reported, never asserted: timings are noisy on a shared 2-core machine):
(b)/(a) <= 1.10 and (c)/(b) >= 30. The ratio table is printed at the end and written to
``benchmarks/results/core_latency.{json,md}`` by ``latency_record`` (conftest.py).
"""
from __future__ import annotations

import pytest

from gradprobe import bench

#: (rounds, warm-up) per engine and batch; (c) is ~50x slower than (b), so it gets fewer rounds.
ROUNDS = {1: {"a": 200, "b": 200, "c": 30, "d": 100}, 64: {"a": 50, "b": 50, "c": 10, "d": 50}}
WARMUP = {"a": 5, "b": 5, "c": 1, "d": 3}
CASES = [(batch, engine) for batch in (1, 64) for engine in ("a", "b", "c")]


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
    benchmark.extra_info.update(engine=engine, label=bench.ENGINES[engine], batch=batch, threads=threads,
                                inputs=description)
    benchmark.pedantic(built[engine], args=(images,), rounds=ROUNDS[batch][engine],
                       warmup_rounds=WARMUP[engine], iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        latency_record["times"][(engine, batch)] = list(benchmark.stats.stats.data)


def test_gradcam_peers(core_bundle, core_images, latency_record, threads, record_property):
    """(d) pytorch-grad-cam GradCAM in the peers venv, right after (a)-(c), same batches and rounds as (b)."""
    python, where = bench.find_peers_python()
    if python is None:
        reason = f"(d) skipped: {where}"
        latency_record["skipped"].append(reason)
        pytest.skip(reason)
    images = {batch: core_images[batch][0] for batch in (1, 64)}
    peer = bench.run_gradcam_peer(python, core_bundle, images, {b: ROUNDS[b]["d"] for b in images},
                                  WARMUP["d"], threads)
    for batch in images:
        seconds = peer["batches"][str(batch)]
        latency_record["times"][("d", batch)] = seconds
        row = bench.summarize("d", batch, seconds)
        record_property(f"gradcam_batch{batch}_median_ms", row["median_ms"])
        record_property(f"gradcam_batch{batch}_p90_ms", row["p90_ms"])
    latency_record["extra"]["peers"] = {k: v for k, v in peer.items() if k != "batches"}
