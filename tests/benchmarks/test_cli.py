"""``gradprobe bench`` / ``gradprobe eval``: forwarded to benchmarks.cli from a checkout, refused clearly without one."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import cli
from benchmarks.harness.peers import CHECKOUT, PEERS_ENV


def _gradprobe(*arguments, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if k != "GRADPROBE_SOURCE"}
    environment.update(env)
    return subprocess.run([sys.executable, "-m", "gradprobe.cli", *map(str, arguments)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_bench_without_a_checkout_says_so(tmp_path):
    done = _gradprobe("bench", tmp_path / "bundle", "--rounds", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert "source checkout" in done.stderr and "GRADPROBE_SOURCE" in done.stderr and str(tmp_path) in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_from_the_checkout_runs_and_writes(tiny_bundle, tmp_path):
    out = tmp_path / "results"
    done = _gradprobe("bench", tiny_bundle, "--rounds", "2", "--batch", "2", "--threads", "1", "--quiet",
                      "--out", out, cwd=CHECKOUT, **{PEERS_ENV: str(tmp_path / "missing-python")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| (b) ORT probe graph, all outputs |" in done.stdout and f"wrote {out / 'latency.json'}" in done.stdout
    result = json.loads((out / "latency.json").read_text())
    assert {(r["engine"], r["n"]) for r in result["rows"]} == {("a", 2), ("b", 2), ("c", 2)}
    assert any(s.startswith("(d) skipped") and "missing-python" in s for s in result["skipped"])


def test_eval_help_lists_the_evaluations_through_gradprobe(tmp_path):
    """Leading options reach the harness's parser (GRADPROBE_SOURCE names the checkout from elsewhere)."""
    done = _gradprobe("eval", "-h", cwd=tmp_path, GRADPROBE_SOURCE=str(CHECKOUT))
    assert done.returncode == 0, done.stderr
    for name in ("ood", "corruption", "faithfulness", "explain-speed", "layer-grads", "parity"):
        assert name in done.stdout


def test_bench_errors_are_reported_not_raised(tiny_bundle, capsys):
    assert cli.main(["bench", str(tiny_bundle), "--batch", "1,x", "--quiet"]) == 2
    assert "--batch takes comma-separated integers" in capsys.readouterr().err


def test_every_evaluation_has_its_options():
    parser = cli.build_parser()
    args = parser.parse_args(["eval", "ood", "--n", "50", "--no-peers", "--no-layer-grads"])
    assert (args.evaluation, args.n, args.no_peers, args.layer_grads) == ("ood", 50, True, False)
    assert parser.parse_args(["eval", "corruption"]).n == 300
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "no-such-evaluation"])
    assert set(cli.evaluations()) == {"ood", "corruption", "faithfulness", "explain-speed", "layer-grads", "parity",
                                      "contrastive", "gradcon", "gradcon-speed"}
    assert parser.parse_args(["eval", "gradcon", "--quick"]).quick
    assert parser.parse_args(["eval", "gradcon-speed", "--threads", "1"]).threads == 1
