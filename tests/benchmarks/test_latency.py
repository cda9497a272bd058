"""benchmarks.latency on a tiny bundle: engines, report structure, skips (never asserts wall-clock times)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import gradprobe
from gradprobe.base.bundle import Bundle
from gradprobe.export.parity import RELATIVE, parity_errors

from benchmarks import latency


@pytest.fixture(scope="module")
def result(tiny_bundle):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADPROBE_PEERS_PYTHON", "/nonexistent/peers/bin/python")
        return latency.run_latency(tiny_bundle, batches=(2,), rounds=2, threads=1, progress=False)


def test_rows_cover_engines_a_b_c(result):
    rows = {(r["engine"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {("a", 2), ("b", 2), ("c", 2)}
    for row in rows.values():
        assert row["n"] == 2 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"] + 1e-9
        assert row["label"] == latency.ENGINES[row["engine"]]


def test_ratios_are_quotients_of_reported_medians(result):
    medians = {r["engine"]: r["median_ms"] for r in result["rows"]}
    (entry,) = result["ratios"]
    assert entry["batch"] == 2
    assert entry["b/a"] == pytest.approx(medians["b"] / medians["a"], rel=1e-12)
    assert entry["c/b"] == pytest.approx(medians["c"] / medians["b"], rel=1e-12)
    assert entry["d/b"] is None


def test_missing_peers_skip_d_with_the_reason(result):
    (reason,) = [s for s in result["skipped"] if s.startswith("(d)")]
    assert "skipped" in reason and "/nonexistent/peers/bin/python" in reason and "GRADPROBE_PEERS_PYTHON" in reason
    assert not result["drift"]
    assert [(t["ratio"], t["batch"], t["holds"]) for t in result["targets"]] == [("b/a", 64, None), ("c/b", 64, None)]


def test_report_records_the_load_and_the_maps(result, tiny_bundle):
    environment = result["environment"]
    assert {"busy_cores_before", "other_busy_cores_during", "threads", "onnxruntime"} <= set(environment)
    assert environment["threads"] == 1
    assert result["maps"] == [spec.name for spec in Bundle.open(tiny_bundle).manifest.classifier.maps]
    assert "gradcam_pp" in result["maps"]


def test_table_and_files(result, tmp_path):
    table = latency.format_table(result)
    assert "(a) ORT logits only" in table and "| 2 |" in table and "NOT MEASURED" in table
    assert "(d) skipped" in table and "CPU cores on average during the run" in table
    paths = latency.write(result, "latency", tmp_path / "out")
    assert json.loads(paths[0].read_text())["rows"] == result["rows"]
    assert table in paths[1].read_text()


def test_compose_targets_at_batch_64():
    rows = [latency.row(e, 64, [t]) for e, t in (("a", 0.010), ("b", 0.0105), ("c", 0.5), ("d", 0.1))]
    ratios, targets = latency.compose(rows)
    assert ratios[0]["b/a"] == pytest.approx(1.05) and ratios[0]["c/b"] == pytest.approx(0.5 / 0.0105)
    assert ratios[0]["d/b"] == pytest.approx(0.1 / 0.0105)
    assert [t["holds"] for t in targets] == [True, True]
    rows[1] = latency.row("b", 64, [0.02])
    assert [t["holds"] for t in latency.compose(rows)[1]] == [False, False]


def test_engines_compute_what_they_claim(tiny_bundle):
    """(a) is the probe graph's forward only; (b) gives every output Probe.run gives; (c) agrees with both."""
    built, skipped = latency.build_engines(tiny_bundle, threads=1)
    assert skipped == [] and set(built) == {"a", "b", "c"}
    images = np.random.default_rng(3).random((3, 1, 28, 28), dtype=np.float32)
    logits_only, probe_graph, reference = built["a"](images), built["b"](images), built["c"](images)
    expected = gradprobe.load(tiny_bundle).run(images)
    assert list(logits_only) == ["logits"]
    np.testing.assert_allclose(logits_only["logits"], expected.logits, rtol=1e-6, atol=1e-6)
    assert set(probe_graph) == set(expected.outputs)
    for name, value in expected.outputs.items():
        np.testing.assert_allclose(probe_graph[name], value, rtol=1e-6, atol=1e-7)
    errors = parity_errors(probe_graph, reference)
    assert set(errors) >= {"logits", "cam", "gradcam_pp", "label_grad_sqnorm"}
    assert max(errors.values()) <= RELATIVE, errors


def test_bundle_without_weights_skips_the_reference_and_gradcam(weightless_bundle, no_peers):
    result = latency.run_latency(weightless_bundle, batches=(1,), rounds=1, threads=1, progress=False,
                                 engines=("a", "c", "d"))
    assert [r["engine"] for r in result["rows"]] == ["a"]
    assert result["skipped"] == [
        "(c) skipped: bundle has no model weights (model.safetensors); export a gradprobe reference model",
        f"(d) skipped: bundle {weightless_bundle} has no model weights (model.safetensors): the peers cannot "
        "rebuild its model; export a gradprobe reference model"]


@pytest.mark.parametrize(("options", "message"), [
    ({"batches": (0,)}, "batch size must be a positive integer"),
    ({"batches": ()}, "at least one batch size"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"rounds": True}, "rounds must be a positive integer"),
    ({"engines": ("a", "x")}, "unknown engines ['x']"),
])
def test_bad_options_are_refused(tiny_bundle, options, message):
    with pytest.raises(gradprobe.InputError) as caught:
        latency.run_latency(tiny_bundle, progress=False, **options)
    assert message in str(caught.value)


def test_parse_batches():
    assert latency.parse_batches("1, 64") == [1, 64]
    for text in ("1,x", "0", ""):
        with pytest.raises(gradprobe.InputError):
            latency.parse_batches(text)
