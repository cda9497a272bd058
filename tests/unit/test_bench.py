"""gradprobe.bench: structure of the latency report on a tiny model (never asserts wall-clock times)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe import bench
from gradprobe.models import build_model


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    model = build_model("resnet-tiny").eval()
    images = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    return gradprobe.export(model, images, tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def result(tiny_bundle, tmp_path_factory):
    # No peers venv: run from an empty folder with the environment variable unset.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("nopeers"))
        patch.delenv(bench.PEERS_ENV, raising=False)
        return bench.run_latency(tiny_bundle, batches=(2,), rounds=2, threads=1, progress=False)


def test_rows_cover_engines_a_b_c(result):
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("a", 2), ("b", 2), ("c", 2)}
    for row in rows.values():
        assert row["n"] == 2
        assert 0 < row["median_ms"] <= row["p90_ms"] + 1e-9
        assert row["label"] == bench.ENGINES[row["engine"]]


def test_ratios_are_quotients_of_reported_medians(result):
    medians = {r["engine"]: r["median_ms"] for r in result["rows"]}
    (entry,) = result["ratios"]
    assert entry["batch"] == 2
    assert entry["b/a"] == pytest.approx(medians["b"] / medians["a"], rel=1e-12)
    assert entry["c/b"] == pytest.approx(medians["c"] / medians["b"], rel=1e-12)
    assert entry["d/b"] is None


def test_skipped_gradcam_says_why_and_targets_not_measured(result):
    (reason,) = [s for s in result["skipped"] if s.startswith("(d)")]
    assert "skipped" in reason and ".venv-peers" in reason and "make peers" in reason
    assert not result["drift"]
    assert [t["ratio"] for t in result["targets"]] == ["b/a", "c/b"]
    assert all(t["holds"] is None and t["batch"] == 64 for t in result["targets"])


def test_table_and_files(result, tmp_path):
    table = bench.format_table(result)
    assert "(a) ORT logits only" in table and "| 2 |" in table and "NOT MEASURED" in table
    assert "(d) skipped" in table
    json_path, md_path = bench.write_results(result, tmp_path / "out", name="latency")
    assert json.loads(json_path.read_text())["rows"] == result["rows"]
    assert table in md_path.read_text()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_compose_targets_at_batch_64():
    rows = [bench.summarize(e, 64, [t]) for e, t in (("a", 0.010), ("b", 0.0105), ("c", 0.5), ("d", 0.1))]
    ratios, targets = bench.compose(rows)
    assert ratios[0]["b/a"] == pytest.approx(1.05) and ratios[0]["c/b"] == pytest.approx(0.5 / 0.0105)
    assert [t["holds"] for t in targets] == [True, True]
    rows[1] = bench.summarize("b", 64, [0.02])
    assert [t["holds"] for t in bench.compose(rows)[1]] == [False, False]


def test_spread_schedule_interleaves():
    order = bench.spread_schedule({"a": 6, "b": 6, "c": 2})
    assert sorted(order) == sorted("a" * 6 + "b" * 6 + "c" * 2)
    positions = [i for i, name in enumerate(order) if name == "c"]
    assert positions[0] > 0 and positions[-1] - positions[0] >= 4  # spread, not bunched at one end


def test_no_weights_skips_reference(tiny_bundle, tmp_path, monkeypatch):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    manifest["model"]["weights"] = None
    monkeypatch.setattr(bench, "read_manifest", lambda _path: manifest)
    built, skipped = bench.build_engines(tiny_bundle, tmp_path, threads=1, engines=("c",))
    assert built == {} and skipped == [
        "(c) skipped: bundle has no model weights (model.safetensors); export a gradprobe reference model"]


def test_cli_command_registers(tiny_bundle):
    parser = argparse.ArgumentParser(prog="gradprobe")
    bench.add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", str(tiny_bundle), "--batch", "1,64", "--rounds", "3", "--threads", "1",
                              "--peers-python", "/x/python", "--out", "o"])
    assert (args.batch, args.rounds, args.threads, args.peers_python, args.out) == ("1,64", 3, 1, "/x/python", "o")
    assert args.handler is bench._bench_command
    assert bench._parse_batches("1, 64") == [1, 64]
    with pytest.raises(gradprobe.InputError):
        bench._parse_batches("1,x")


def test_bench_import_does_not_import_torch():
    code = "import sys, gradprobe.bench; sys.exit('torch' in sys.modules or 'onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
