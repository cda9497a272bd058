"""Fixtures of the serving suite: a calibrated bundle, free localhost ports, and a real `gradprobe serve` process.

The server runs as its own process (``python -m gradprobe.cli serve``) so tests talk to it over real
HTTP and gRPC, and the fault test can kill it. Everything binds to 127.0.0.1.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import gradprobe

READY_WAIT_S = 180  # a bound on start-up (Triton + the Python-backend stub), never an assertion about speed
MAX_BATCH = 16


@pytest.fixture(scope="session")
def serve_bundle(tmp_path_factory, fmnist_test):
    """The shipped model, exported and calibrated with the no-OOD detector, so detector outputs are served."""
    images, _ = fmnist_test
    path = tmp_path_factory.mktemp("serve") / "bundle"
    gradprobe.export(gradprobe.models.load_pretrained("resnet-fmnist"), images[:4], path)
    gradprobe.load(path).calibrate(images[1000:1200], kind="ood-free")
    return path


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class ServerProcess:
    """``gradprobe serve`` in its own session (process group) with its log in a file."""

    def __init__(self, bundle, http_port: int, grpc_port: int, log_path, *extra: str):
        self.bundle, self.http_port, self.grpc_port, self.log_path = bundle, http_port, grpc_port, log_path
        self.extra = extra
        self.process = None

    def start(self) -> "ServerProcess":
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe.cli", "serve", str(self.bundle), "--host", "127.0.0.1",
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--max-batch", str(MAX_BATCH),
             "--threads", "1", *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_WAIT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"gradprobe serve exited with {self.process.returncode}:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"gradprobe serve was not ready within {READY_WAIT_S} s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/models/gradprobe/ready",
                                        timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def tail(self, lines: int = 40) -> str:
        return "\n".join(open(self.log_path, errors="replace").read().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server process alone (as a crash would); Triton follows it through PDEATHSIG."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the whole process group: the server, tritonserver and its stubs."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # leftovers of this server's own group only
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()

    def wait_ports_free(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if port_is_free(self.http_port) and port_is_free(self.grpc_port):
                return
            time.sleep(0.5)
        pytest.fail(f"ports {self.http_port}/{self.grpc_port} still taken {timeout} s after the server died")


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
