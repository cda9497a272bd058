"""benchmarks.harness.timing: schedules, rounds, summaries, ratios, targets, load checks, result files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.harness import timing


# ----------------------------------------------------------------------------------------- schedule
def test_spread_schedule_counts_and_alternates_equal_engines():
    order = timing.spread_schedule({"a": 5, "b": 5})
    assert sorted(order) == ["a"] * 5 + ["b"] * 5
    pairs = [order[i:i + 2] for i in range(0, 10, 2)]
    assert all(sorted(pair) == ["a", "b"] for pair in pairs)  # every slot runs each engine once
    assert [pair[0] for pair in pairs] == ["a", "b", "a", "b", "a"]  # and the first of a slot rotates


def test_spread_schedule_spreads_the_engine_with_fewer_rounds():
    order = timing.spread_schedule({"a": 12, "b": 12, "c": 3})
    assert sorted(order) == sorted("a" * 12 + "b" * 12 + "c" * 3)
    positions = [i for i, name in enumerate(order) if name == "c"]
    gaps = np.diff(positions)
    assert len(positions) == 3 and positions[0] >= 2 and positions[-1] >= len(order) - 10
    assert gaps.min() >= 6 and gaps.max() - gaps.min() <= 3  # evenly over the run, not bunched at one end
    for engine in "ab":  # the others never wait more than one slot of c
        spots = [i for i, name in enumerate(order) if name == engine]
        assert np.diff(spots).max() <= 4


def test_spread_schedule_empty():
    assert timing.spread_schedule({}) == []


def test_time_interleaved_follows_the_schedule_after_the_warm_up():
    calls = []
    engines = {name: (lambda feeds, name=name: calls.append((name, feeds))) for name in ("a", "b", "c")}
    policies = {"a": timing.RoundsPolicy(1.0, 1, 10, warmup=2), "b": timing.RoundsPolicy(1.0, 1, 10, warmup=1),
                "c": timing.RoundsPolicy(0.0, 2, 2, warmup=1)}
    times = timing.time_interleaved(engines, "x", policies, {"a": 4, "b": 4})
    assert [name for name, _ in calls[:4]] == ["a", "a", "b", "c"]  # warm-up: per policy, engine by engine
    assert [name for name, _ in calls[4:]] == timing.spread_schedule({"a": 4, "b": 4, "c": 2})
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 4, "b": 4, "c": 2}  # c: its policy
    assert all(feeds == "x" for _, feeds in calls)
    assert all(s >= 0 for seconds in times.values() for s in seconds)


def test_rounds_policy_clamps_the_budget():
    policy = timing.RoundsPolicy(budget_s=2.0, min_rounds=5, max_rounds=50)
    assert policy.rounds(0.1) == 20
    assert policy.rounds(10.0) == 5
    assert policy.rounds(1e-9) == 50


def test_time_interleaved_refuses_non_positive_rounds():
    policy = {"a": timing.RoundsPolicy(1.0, 1, 2)}
    with pytest.raises(ValueError):
        timing.time_interleaved({"a": lambda x: None}, None, policy, {"a": -1})


# -------------------------------------------------------------------------------- summaries, ratios
def test_summarize_in_milliseconds():
    seconds = [0.004, 0.001, 0.002, 0.003, 0.010]
    summary = timing.summarize(seconds)
    assert summary["n"] == 5
    assert summary["median_ms"] == pytest.approx(3.0)
    assert summary["p90_ms"] == pytest.approx(np.percentile(seconds, 90) * 1e3)
    assert summary["mean_ms"] == pytest.approx(4.0) and summary["min_ms"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        timing.summarize([])


def test_ratio_is_the_quotient_of_the_reported_medians():
    rows = [{"engine": e, "batch": b, **timing.summarize(s)} for e, b, s in (
        ("a", 1, [0.002, 0.001, 0.003]), ("b", 1, [0.004, 0.0045, 0.001]), ("a", 64, [0.02, 0.03, 0.01]),
        ("b", 64, [0.021, 0.02, 0.05]), ("c", 64, [1.0]))]
    entries = timing.compose_ratios(rows, [("b/a", "b", "a"), ("c/b", "c", "b")])
    medians = {(r["batch"], r["engine"]): r["median_ms"] for r in rows}
    assert [e["batch"] for e in entries] == [1, 64]
    assert entries[0]["b/a"] == pytest.approx(medians[(1, "b")] / medians[(1, "a")], rel=1e-12)
    assert entries[0]["c/b"] is None  # c not measured at batch 1
    assert entries[1]["b/a"] == pytest.approx(21 / 20) and entries[1]["c/b"] == pytest.approx(1000 / 21)


def test_compose_ratios_groups_by_several_keys():
    rows = [{"model": m, "batch": 1, "engine": e, "median_ms": v}
            for m, e, v in (("x", "ours", 2.0), ("x", "peer", 9.0), ("y", "ours", 1.0), ("y", "peer", 5.0))]
    entries = timing.compose_ratios(rows, [("peer / ours", "peer", "ours")], group=("model", "batch"))
    assert entries == [{"model": "x", "batch": 1, "peer / ours": 4.5}, {"model": "y", "batch": 1, "peer / ours": 5.0}]


def test_targets_hold_fail_or_are_not_measured():
    entries = [{"batch": 1, "b/a": 2.0}, {"batch": 64, "b/a": 1.05}]
    at_64 = timing.Target("b/a", "<=", 1.10, {"batch": 64})
    assert at_64.check(entries)["holds"] is True and at_64.check(entries)["value"] == 1.05
    assert timing.Target("b/a", "<=", 1.0, {"batch": 64}).check(entries)["holds"] is False
    assert timing.Target("b/a", ">", 1.05, {"batch": 64}).check(entries)["holds"] is False
    missing = timing.Target("b/a", "<=", 1.10, {"batch": 32}).check(entries)
    assert missing["holds"] is None and missing["value"] is None and "not measured" in missing["note"]
    lines = timing.target_lines([at_64.check(entries), missing])
    assert "**HOLDS** (measured 1.050)" in lines[0] and "at batch 64" in lines[0] and "NOT MEASURED" in lines[1]


# ----------------------------------------------------------------------------------------- CPU load
def _fake_clock(monkeypatch, samples):
    """OtherLoad reads (wall, /proc/stat busy ticks, own CPU s) from ``samples`` in turn."""
    state = iter(samples)
    current = {}

    def proc_stat():
        current.update(zip(("wall", "busy", "own"), next(state)))
        return [int(current["busy"] * 100), 0, 0, 0, 0, 0, 0, 0]  # all busy time in "user", 100 ticks/s

    class Times:
        def __init__(self):
            self.user, self.system, self.children_user, self.children_system = current["own"], 0.0, 0.0, 0.0

    monkeypatch.setattr(timing, "_proc_stat", proc_stat)
    monkeypatch.setattr(timing.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(timing.os, "times", Times)
    monkeypatch.setattr(timing.time, "monotonic", lambda: current["wall"])


def test_other_load_subtracts_our_own_cpu_time(monkeypatch):
    # over 2 s of wall time the machine was busy 5 core-seconds, 1 of them ours: others used 2 cores
    _fake_clock(monkeypatch, [(10.0, 100.0, 3.0), (12.0, 105.0, 4.0)])
    assert timing.OtherLoad().start().stop() == pytest.approx(2.0)


def test_other_load_never_negative_and_none_without_proc(monkeypatch):
    _fake_clock(monkeypatch, [(0.0, 0.0, 0.0), (1.0, 0.5, 1.0)])
    assert timing.OtherLoad().start().stop() == 0.0

    def unreadable():
        raise OSError("no /proc")

    monkeypatch.setattr(timing, "_proc_stat", unreadable)
    assert timing.OtherLoad().start().stop() is None
    assert timing.busy_cores(0.0) is None


def test_load_lines_call_a_busy_run_skewed():
    busy = timing.load_lines({"busy_cores_before": 1.2, "other_busy_cores_during": 0.9})
    assert len(busy) == 2 and all("WARNING" in line for line in busy) and "0.9 CPU cores" in busy[1]
    quiet = timing.load_lines({"busy_cores_before": 0.0, "other_busy_cores_during": timing.QUIET_CORES})
    assert quiet == [f"- other processes used {timing.QUIET_CORES} CPU cores on average during the run: a clean run"]


def test_load_watch_records_before_and_during():
    with timing.load_watch(settle_s=0.05) as load:
        assert set(load) == {"load_average_before", "busy_cores_before"}
    assert {"other_busy_cores_during", "load_average_after"} <= set(load)
    assert load["other_busy_cores_during"] is None or load["other_busy_cores_during"] >= 0


# ---------------------------------------------------------------------------------- records, files
def test_environment_names_versions_without_importing_them():
    env = timing.environment(3, extra="x")
    assert env["threads"] == 3 and env["ort_spinning"] is False and env["extra"] == "x"
    assert env["numpy"] == np.__version__ and isinstance(env["onnxruntime"], str)
    assert timing.versions("surely-not-a-distribution-name") == {"surely-not-a-distribution-name": None}


def test_write_results_atomic_json_and_markdown(tmp_path):
    payload = {"median": np.float64(1.5), "n": np.int64(3), "rows": np.arange(2), "where": tmp_path,
               "policy": timing.RoundsPolicy(1.0, 2, 3)}
    written = timing.write_results("demo", "| table |", payload, tmp_path / "out")
    assert [p.name for p in written] == ["demo.json", "demo.md"]
    data = json.loads(written[0].read_text())
    assert data == {"median": 1.5, "n": 3, "rows": [0, 1], "where": str(tmp_path),
                    "policy": {"budget_s": 1.0, "min_rounds": 2, "max_rounds": 3, "warmup": 1}}
    assert written[1].read_text() == "| table |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo.json", "demo.md"]  # no temporaries left
    assert [p.name for p in timing.write_results("only", "text\n", None, tmp_path / "md")] == ["only.md"]


def test_write_results_leaves_the_old_file_when_the_data_cannot_be_written(tmp_path):
    timing.write_results("demo", "old\n", {"a": 1}, tmp_path)
    with pytest.raises(TypeError):
        timing.write_results("demo", "new\n", {"a": object()}, tmp_path)
    assert json.loads((tmp_path / "demo.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.json", "demo.md"]
