"""`gradprobe score --ray ADDRESS`: scoring on a Ray cluster that was started on its own (`ray start --head`),
the way a multi-node cluster is joined: the driver is a separate process that knows only the address, and the
cluster's token (Ray's token authentication, as a cluster reachable over a network should run)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data", reason="needs the [scale] extra: make serve-setup, then make test-serve")
pq = pytest.importorskip("pyarrow.parquet")

import gradprobe  # noqa: E402

from .conftest import free_ports  # noqa: E402

pytestmark = pytest.mark.serve
RAY = str(Path(sys.executable).with_name("ray"))
START_WAIT_S = 180  # a bound on start-up, never an assertion about speed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head with 2 CPUs, in processes of its own, on this node's address (as `ray start` prints it for
    workers to join); stopped (all of Ray's processes here) afterwards."""
    port, = free_ports(1)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    started = subprocess.run([sys.executable, RAY, "start", "--head", "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True,
                             timeout=START_WAIT_S)
    assert started.returncode == 0, started.stderr[-3000:]
    from ray.util import get_node_ip_address

    try:
        yield f"{get_node_ip_address()}:{port}", env
    finally:
        subprocess.run([sys.executable, RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_scores_on_an_existing_cluster_like_probe_run(cluster, serve_bundle, fmnist_test, tmp_path):
    address, env = cluster
    images = fmnist_test[0][:96]
    np.save(tmp_path / "images.npy", images)
    done = subprocess.run([sys.executable, "-m", "gradprobe.cli", "score", str(serve_bundle), str(tmp_path / "images.npy"),
                           str(tmp_path / "out"), "--ray", address, "--actors", "2", "--batch", "32"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(tmp_path / "out").to_pydict()
    order = np.argsort(table["index"])
    detection = gradprobe.load(serve_bundle).detect(images)
    np.testing.assert_array_equal(np.asarray(table["pred"])[order], detection.probe.pred)
    np.testing.assert_allclose(np.asarray(table["detector_score"])[order], detection.score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(table["probs"])[order], detection.probe.probs, rtol=1e-5, atol=1e-6)
