"""benchmarks.harness.peers: finding the peers python, running a script with a spec, parsing its result."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import latency
from benchmarks.harness import peers

SCRIPT = """
import json, os, sys
spec = json.load(open(sys.argv[-1]))
print("progress: warming up")
print('{"not": "the last"}')
print(json.dumps({"args": sys.argv[1:-1], "spec": spec, "threads": os.environ["OMP_NUM_THREADS"]}))
print("{a trailing line that only looks like JSON")
"""


def _script(tmp_path, text: str, name: str = "peer.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------------- finding the python
def test_missing_environment_python_is_refused_with_its_path(no_peers, monkeypatch):
    with pytest.raises(peers.PeersUnavailable) as caught:
        peers.find_peers_python()
    assert str(no_peers) in str(caught.value) and peers.PEERS_ENV in str(caught.value)


def test_explicit_python_wins_and_is_never_replaced(no_peers, tmp_path):
    assert peers.find_peers_python(sys.executable) == Path(sys.executable)
    with pytest.raises(peers.PeersUnavailable, match="--peers-python"):
        peers.find_peers_python(tmp_path / "missing-python")


def test_environment_python_is_used(monkeypatch):
    monkeypatch.setenv(peers.PEERS_ENV, sys.executable)
    assert str(peers.find_peers_python()) == sys.executable


def test_default_is_the_checkouts_venv(monkeypatch, tmp_path):
    monkeypatch.delenv(peers.PEERS_ENV, raising=False)
    monkeypatch.setattr(peers, "CHECKOUT", tmp_path)
    with pytest.raises(peers.PeersUnavailable, match="make peers"):
        peers.find_peers_python()
    python = tmp_path / ".venv-peers" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert peers.find_peers_python() == python


# ----------------------------------------------------------------------------------- running a script
def test_run_peer_passes_spec_and_arguments_and_returns_the_last_json_line(tmp_path):
    script = _script(tmp_path, SCRIPT)
    result = peers.run_peer(script, {"batch": 2, "names": ["x"]}, "time", python=sys.executable, threads=3)
    assert result == {"args": ["time"], "spec": {"batch": 2, "names": ["x"]}, "threads": "3"}


def test_run_peer_reports_a_failing_script_with_its_stderr(tmp_path):
    script = _script(tmp_path, """
        import sys
        print('{"partial": 1}')
        sys.exit("torchvision is broken here")
        """)
    with pytest.raises(peers.PeersFailed, match="exited with 1.*torchvision is broken here"):
        peers.run_peer(script, {}, python=sys.executable)


def test_run_peer_without_a_result_line(tmp_path):
    script = _script(tmp_path, "print('done, but no result')\n")
    with pytest.raises(peers.PeersFailed, match="no JSON result"):
        peers.run_peer(script, {}, python=sys.executable)


def test_run_peer_missing_script_or_python(tmp_path, no_peers):
    with pytest.raises(peers.PeersFailed, match="does not exist"):
        peers.run_peer("no_such_peer_script.py", {}, python=sys.executable)
    with pytest.raises(peers.PeersUnavailable, match=str(no_peers)):
        peers.run_peer(_script(tmp_path, SCRIPT), {})


def test_peer_scripts_resolve_under_benchmarks_peers():
    assert (peers.SCRIPTS / "gradcam_timing.py").is_file() and (peers.SCRIPTS / "explain_peers.py").is_file()


# ---------------------------------------------------------------------------------------- model spec
def test_model_spec_of_a_reference_bundle(tiny_bundle):
    spec = peers.model_spec(tiny_bundle, threads=3)
    assert spec["checkpoint"].endswith("model.safetensors") and spec["threads"] == 3
    assert spec["target_layer"] and len(spec["normalize"]["mean"]) == 1 == len(spec["normalize"]["std"])


def test_model_spec_without_weights_is_a_skip_with_the_reason(weightless_bundle):
    with pytest.raises(peers.PeersUnavailable, match="no model weights"):
        peers.model_spec(weightless_bundle)


@pytest.mark.peers
def test_gradcam_timing_in_the_peers_venv(tiny_bundle):
    """The real peer script through the runner: the spec contract of engine (d) holds in the peers venv."""
    try:
        peers.find_peers_python()
    except peers.PeersUnavailable as error:
        pytest.skip(str(error))
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    result = latency.gradcam_peer(tiny_bundle, {3: images}, rounds=2, threads=1)
    assert len(result["batches"]["3"]) == 2 and all(s > 0 for s in result["batches"]["3"])
    assert result["map_shapes"]["3"] == [3, 28, 28] and result["grad_cam"]
