"""Fixtures of the serving suite: a calibrated bundle, free localhost ports, and a real `gradprobe serve` process.

The server runs as its own process (``python -m gradprobe.cli serve``) so tests talk to it over real
HTTP and gRPC, and the fault test can kill it. Everything binds to 127.0.0.1.
"""
from __future__ import annotations

import numpy as np
import pytest

import gradprobe
from gradprobe import GradprobeError
from gradprobe.serve.process import ServerProcess as _ServerProcess
from gradprobe.serve.process import free_ports  # noqa: F401 - used by the tests

READY_WAIT_S = 180  # a bound on start-up (Triton + the Python-backend stub), never an assertion about speed
MAX_BATCH = 16


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory, fmnist_test):
    """The shipped model, exported and calibrated with the no-OOD detector, so detector outputs are served."""
    pytest.importorskip("torch", reason="exporting the test bundle needs torch (the [export] extra)")
    images, _ = fmnist_test
    path = tmp_path_factory.mktemp("serve") / "bundle"
    gradprobe.export(gradprobe.models.load_pretrained("resnet-fmnist"), images[:4], path)
    gradprobe.load(path).calibrate(images[1000:1200], kind="ood-free")
    return path


class ServerProcess(_ServerProcess):
    """The SDK's launcher with this suite's max batch and one ORT thread; a failed start fails the test."""

    def __init__(self, bundle, http_port, grpc_port, log_path):
        super().__init__(bundle, http_port, grpc_port, log_path, "--max-batch", str(MAX_BATCH), "--threads", "1")

    def start(self, limit_s: float = READY_WAIT_S) -> "ServerProcess":
        try:
            super().start(limit_s)
        except GradprobeError as error:
            pytest.fail(str(error))
        return self


@pytest.fixture(scope="module")
def server(serve_bundle, tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs the [serve] extra: make serve-setup, then make test-serve")
    http_port, grpc_port = free_ports(2)
    process = ServerProcess(serve_bundle, http_port, grpc_port, tmp_path_factory.mktemp("logs") / "serve.log").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def serve_images(fmnist_test):
    return np.ascontiguousarray(fmnist_test[0][:40])
