"""Load and fault test of `gradprobe serve` against localhost only; writes benchmarks/results/serve.{md,json}.

Bounded: every phase sends a fixed number of requests and stops at a time limit; traffic goes to
127.0.0.1 only. For N = 1, 4, 16 concurrent clients (HTTP and gRPC) it measures throughput and
p50/p99 latency, side by side with in-process ``Probe.run`` at the same batch size (same ONNX Runtime
thread count), interleaved so both see the same machine load. Every answer is checked against
``Probe.run`` (lost = an error, mismatched = a different answer). Then the fault phase: clients under
load, the server process SIGKILLed, how long each client takes to get an error, and a restart.

Run in the serving venv: `make bench-serve` (or `.venv-serve/bin/python -m benchmarks.serve_load`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import gradprobe

from .harness import timing
from gradprobe.serve.client import ProbeClient
from gradprobe.serve.process import HOST, ServerProcess, free_ports

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    return free_ports(1)[0]


def Server(bundle, http_port, grpc_port, log, threads) -> ServerProcess:
    return ServerProcess(bundle, http_port, grpc_port, log, "--max-batch", "64", "--threads", str(threads))


def percentiles(latencies) -> dict:
    values = np.asarray(latencies) * 1e3
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def run_clients(server, protocol, clients, requests, images, reference, limit_s, timeout=30.0):
    """``clients`` threads share ``requests`` requests (count-limited) and stop at ``limit_s`` (time-limited)."""
    port = server.http_port if protocol == "http" else server.grpc_port
    batch = len(images)
    lock, latencies, lost, mismatched = threading.Lock(), [], [0], [0]
    remaining = [requests]
    deadline = time.perf_counter() + limit_s

    def worker():
        client = ProbeClient(f"{HOST}:{port}", protocol=protocol, timeout=timeout)
        while time.perf_counter() < deadline:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            began = time.perf_counter()
            try:
                answer = client.infer(images, outputs=["pred", "probs"])
            except Exception:  # noqa: BLE001 - counted as lost
                with lock:
                    lost[0] += 1
                continue
            took = time.perf_counter() - began
            same = (answer["pred"].ravel() == reference.pred).all() and \
                np.allclose(answer["probs"], reference.probs, rtol=1e-5, atol=1e-5)
            with lock:
                latencies.append(took)
                mismatched[0] += not same

    began = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    return {"requests": len(latencies) + lost[0], "answered": len(latencies), "lost": lost[0],
            "mismatched": mismatched[0], "unsent": remaining[0], "images_per_s": len(latencies) * batch / wall,
            **percentiles(latencies)}


def in_process(probe, images, calls):
    latencies = []
    began = time.perf_counter()
    for _ in range(calls):
        start = time.perf_counter()
        probe.run(images)
        latencies.append(time.perf_counter() - start)
    wall = time.perf_counter() - began
    return {"images_per_s": calls * len(images) / wall, **percentiles(latencies)}


def kill_and_restart(bundle, images, reference, workdir, threads, clients=4, timeout=10.0):
    """SIGKILL the server under load: time from the kill to each client's error; then restart."""
    http_port, grpc_port = free_port(), free_port()
    server = Server(bundle, http_port, grpc_port, workdir / "kill.log", threads)
    server.start()
    killed_at, errors, lock = [None], [], threading.Lock()
    stop_at = time.perf_counter() + 60

    def worker(protocol):
        port = http_port if protocol == "http" else grpc_port
        client = ProbeClient(f"{HOST}:{port}", protocol=protocol, timeout=timeout)
        for _ in range(5000):  # bounded
            if time.perf_counter() > stop_at:
                break
            try:
                client.infer(images, outputs=["pred"])
            except Exception as error:  # noqa: BLE001 - the error is the measurement
                with lock:
                    errors.append({"protocol": protocol, "error": type(error).__name__,
                                   "seconds_after_kill": None if killed_at[0] is None
                                   else time.perf_counter() - killed_at[0]})
                return

    threads_ = [threading.Thread(target=worker, args=(p,), daemon=True) for p in ("http", "grpc") * (clients // 2)]
    for t in threads_:
        t.start()
    time.sleep(2.0)
    killed_at[0] = time.perf_counter()
    server.process.kill()  # the server process alone, as a crash would
    for t in threads_:
        t.join(timeout=3 * timeout)
    hung = sum(t.is_alive() for t in threads_)
    server.stop()
    server.wait_ports_free()
    again = Server(bundle, http_port, grpc_port, workdir / "restart.log", threads)
    ready_s = again.start()
    answer = ProbeClient(f"{HOST}:{http_port}", timeout=30).infer(images, outputs=["pred"])
    again.stop()
    return {"clients": clients, "client_timeout_s": timeout, "errors": errors, "hung": hung,
            "max_seconds_to_error": max((e["seconds_after_kill"] or 0) for e in errors) if errors else None,
            "restart_ready_s": ready_s, "restart_answer_ok": bool((answer["pred"].ravel() == reference.pred).all())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle to serve (default: export the shipped model)")
    parser.add_argument("--batch", type=int, default=8, help="images per request")
    parser.add_argument("--requests", type=int, default=160, help="requests per (N, protocol)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads, server and in-process alike")
    parser.add_argument("--limit-s", type=float, default=90, help="time limit per phase")
    parser.add_argument("--out", default=str(HERE / "results" / "serve"))
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="gradprobe-serve-load-"))
    images_all, _ = gradprobe.data.fashion_mnist("test")
    bundle = args.bundle
    if bundle is None:
        bundle = workdir / "bundle"
        gradprobe.export(gradprobe.models.load_pretrained("resnet-fmnist"), images_all[:4], bundle)
    images = np.ascontiguousarray(images_all[:args.batch])
    probe = gradprobe.load(bundle, threads=args.threads, spinning=False)
    reference = probe.run(images)

    server = Server(bundle, free_port(), free_port(), workdir / "server.log", args.threads)
    ready_s = server.start()
    rows = []
    try:
        for protocol in ("http", "grpc"):  # warm both paths
            run_clients(server, protocol, 1, 5, images, reference, args.limit_s)
        in_process(probe, images, 5)
        for clients in (int(c) for c in args.clients.split(",")):
            for protocol in ("http", "grpc"):
                local_before = in_process(probe, images, args.requests // 2)
                served = run_clients(server, protocol, clients, args.requests, images, reference, args.limit_s)
                local_after = in_process(probe, images, args.requests // 2)
                local = {k: (local_before[k] + local_after[k]) / 2 for k in local_before}
                rows.append({"clients": clients, "protocol": protocol, "batch": args.batch, "served": served,
                             "in_process": local, "throughput_ratio": served["images_per_s"] / local["images_per_s"],
                             "loadavg": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    fault = kill_and_restart(bundle, images, reference, workdir, args.threads)
    print(json.dumps(fault), flush=True)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "note": "2 cores shared with other work; ratios are measured side by side in one run"},
              "server_ready_s": ready_s, "threads": args.threads, "rows": rows, "fault": fault}
    out = Path(args.out)
    timing.publish(out.name, markdown(report), report, out.parent)


def markdown(report) -> str:
    lines = [
        "# `gradprobe serve` under load (Triton Inference Server through PyTriton, localhost)",
        "",
        f"Written by `python -m benchmarks.serve_load`. Shipped ResNet (Fashion-MNIST), {report['rows'][0]['batch']} images "
        f"per request, ONNX Runtime {report['threads']} thread(s) in the server and in-process; dynamic batching "
        "(max batch 64, 1 ms queue delay). In-process = `Probe.run` on the same batch, interleaved before and after "
        "each served phase. Lost = a request that got an error; mismatched = an answer different from `Probe.run` "
        "(pred equal, probs within 1e-5).",
        "",
        "| clients N | protocol | served img/s | in-process img/s | served / in-process | served p50 / p99 ms "
        "| in-process p50 / p99 ms | answered | lost | mismatched | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        s, p = row["served"], row["in_process"]
        lines.append(f"| {row['clients']} | {row['protocol']} | {s['images_per_s']:.0f} | {p['images_per_s']:.0f} | "
                     f"{row['throughput_ratio']:.2f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
                     f"{p['p50_ms']:.1f} / {p['p99_ms']:.1f} | {s['answered']} | {s['lost']} | {s['mismatched']} | "
                     f"{row['loadavg']:.1f} |")
    fault = report["fault"]
    seconds = [e["seconds_after_kill"] for e in fault["errors"] if e["seconds_after_kill"] is not None]
    lines += [
        "",
        "## Kill and restart",
        "",
        f"{fault['clients']} clients (HTTP and gRPC, client timeout {fault['client_timeout_s']:.0f} s) under load; "
        "the server process was SIGKILLed; its watchdog then SIGKILLs tritonserver, which drops the open connections.",
        "",
        f"- clients that got an error: {len(fault['errors'])} of {fault['clients']} "
        f"({', '.join(sorted({e['protocol'] + ': ' + e['error'] for e in fault['errors']}))}); hung: {fault['hung']}",
        f"- time from the kill to each client's error: "
        f"{', '.join(f'{s * 1e3:.0f}' for s in sorted(seconds))} ms (max {max(seconds) * 1e3 if seconds else float('nan'):.0f} ms)",
        f"- restart on the same ports: ready after {fault['restart_ready_s']:.1f} s; "
        f"answer equal to `Probe.run`: {fault['restart_answer_ok']}",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
