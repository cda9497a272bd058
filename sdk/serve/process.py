"""``gradprobe serve`` as a child process: start it, wait until the model is ready, kill it, stop it.

For tests, benchmarks and scripts that need a real server beside them; it talks to 127.0.0.1 only.
The child runs in its own session, so stopping it takes its tritonserver and stubs along.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gradprobe import GradprobeError

HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


class ServerProcess:
    """``ServerProcess(bundle, http_port, grpc_port, log_path, "--max-batch", "16").start()``; extra
    arguments go to ``gradprobe serve`` as they are."""

    def __init__(self, bundle, http_port: int, grpc_port: int, log_path, *extra: str):
        self.bundle, self.http_port, self.grpc_port = bundle, http_port, grpc_port
        self.log_path, self.extra = Path(log_path), extra
        self.process = None

    def start(self, limit_s: float = 180) -> float:
        """Start and wait until the model is ready; returns the seconds it took. ``limit_s`` bounds the wait."""
        self.log = open(self.log_path, "ab")
        began = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gradprobe.cli", "serve", str(self.bundle), "--host", HOST,
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *self.extra],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - began < limit_s:
            if self.process.poll() is not None:
                raise GradprobeError(f"gradprobe serve exited with {self.process.returncode}:\n{self.tail()}")
            if self.ready():
                return time.perf_counter() - began
            time.sleep(0.25)
        self.stop()
        raise GradprobeError(f"gradprobe serve was not ready within {limit_s} s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/v2/models/gradprobe/ready",
                                        timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the server process alone, as a crash would (its watchdog then kills tritonserver)."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGINT (a clean stop), then SIGKILL whatever is left of this server's own process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()

    def wait_ports_free(self, limit_s: float = 60) -> None:
        """Wait until both ports can be bound again (a dead server's tritonserver may hold them briefly)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if _port_is_free(self.http_port) and _port_is_free(self.grpc_port):
                return
            time.sleep(0.25)
        raise GradprobeError(f"ports {self.http_port}/{self.grpc_port} still taken {limit_s} s after the server died")
