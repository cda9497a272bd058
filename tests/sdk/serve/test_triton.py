"""`gradprobe serve`: a real Triton server (PyTriton) and real tritonclient clients over HTTP and gRPC."""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="needs the [serve] extra: make serve-setup, then make test-serve")
pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[all]: make serve-setup")

import gradprobe  # noqa: E402
from gradprobe.serve.client import ProbeClient  # noqa: E402
from gradprobe.serve.outputs import is_map, probe_outputs  # noqa: E402

from .conftest import MAX_BATCH, ServerProcess, free_ports  # noqa: E402

pytestmark = pytest.mark.serve
PROTOCOLS = ("http", "grpc")


def client(server, protocol: str, timeout: float = 60, check: bool = True) -> ProbeClient:
    port = server.http_port if protocol == "http" else server.grpc_port
    return ProbeClient(f"127.0.0.1:{port}", protocol=protocol, timeout=timeout, check=check)


def expected(bundle, images, contrast=None) -> dict:
    probe = gradprobe.load(bundle)
    detection = probe.detect(images)
    result = probe.run(images, contrast) if contrast is not None else detection.probe
    return probe_outputs(result, detection)


def assert_same(answer: dict, reference: dict, names=None):
    for name in names or reference:
        served = answer[name].reshape(reference[name].shape)
        if served.dtype.kind in "fc":
            np.testing.assert_allclose(served, reference[name], rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(served, reference[name], err_msg=name)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
def test_answers_equal_probe_run(server, serve_bundle, serve_images, protocol, batch):
    images = serve_images[:batch]
    answer = client(server, protocol).infer(images)
    reference = expected(serve_bundle, images)
    assert set(answer) == set(reference)  # every probe output, detector score and decision; no maps unasked
    assert {"detector_score", "is_anomalous"} <= set(answer)
    assert_same(answer, reference)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_contrast_classes_and_maps(server, serve_bundle, serve_images, protocol):
    images, contrast = serve_images[:6], np.array([0, 1, 2, -1, 9, 3], dtype=np.int64)
    probe = gradprobe.load(serve_bundle)
    maps = {name: array for name, array in probe_outputs(probe.run(images, contrast), None,
                                                          probe.explain(images, contrast)).items() if is_map(name)}
    assert {"cam_map", "contrastive_cam_map", "counterfactual_cam_map"} <= set(maps)
    answer = client(server, protocol).infer(images, contrast, maps=True,
                                            outputs=["pred", "contrast_class", "contrastive_cam", *maps])
    assert_same(answer, expected(serve_bundle, images, contrast), ["pred", "contrast_class", "contrastive_cam"])
    for name, array in maps.items():
        np.testing.assert_allclose(answer[name], array, atol=1e-5, err_msg=name)


def nan_images(images):
    bad = images.copy()
    bad[2, 0, 5, 5] = np.nan
    return bad


MALFORMED = {  # name -> (images, contrast, gradprobe's message, Triton's message for the unchecked request)
    "nan": (lambda x: nan_images(x[:4]), None, "images contain NaN or Inf in 1 image(s)", None),
    "contrast": (lambda x: x[:4], np.full(4, 12, np.int64), "contrast class 12 is out of range", None),
    "shape": (lambda x: np.zeros((2, 1, 32, 32), np.float32), None, "images must be 28x28 pixels, shape [B, 1, 28, 28]",
              "[-1,1,28,28]"),
    "rank": (lambda x: x[:2, 0], None, "images must have rank 4, shape [B, 1, 28, 28]; got rank 3", "[-1,1,28,28]"),
    "dtype": (lambda x: x[:2].astype(np.float64), None, "images must have dtype float32, got float64",
              "expects 'FP32'"),
    "oversized": (lambda x: np.zeros((MAX_BATCH + 1, 1, 28, 28), np.float32), None,
                  f"a request holds at most {MAX_BATCH} images", f"<= {MAX_BATCH}"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_gradprobes_message_and_server_goes_on(server, serve_bundle, serve_images, protocol,
                                                                      case):
    """What needs the values reaches the server, whose error response is gradprobe's InputError verbatim; what
    Triton's typed inputs reject (rank, shape, dtype, batch size) the client catches first, with the same
    message ``Probe.run`` gives. Sent unchecked, Triton rejects those itself and the server goes on."""
    make, contrast, message, triton_message = MALFORMED[case]
    with pytest.raises(gradprobe.GradprobeError if triton_message else Exception) as error:
        client(server, protocol).infer(make(serve_images), contrast)
    assert message in str(error.value)
    if triton_message is None:  # reached the server: its error response carries gradprobe's InputError
        assert "InputError: " in str(error.value)
    else:
        with pytest.raises(Exception) as raw:
            client(server, protocol, check=False).infer(make(serve_images), contrast)
        assert triton_message in str(raw.value).replace(" ", "").replace("\\", "") or triton_message in str(raw.value)
    answer = client(server, protocol).infer(serve_images[:3])
    assert_same(answer, expected(serve_bundle, serve_images[:3]), ["pred", "probs"])


def test_bad_request_never_corrupts_answers_batched_with_it(server, serve_bundle, serve_images):
    """PyTriton answers a dynamic batch with one error: requests merged with a NaN one fail with a message
    naming it, or succeed with the right answer; never a wrong answer, and the server goes on."""
    reference = expected(serve_bundle, serve_images[:8])
    outcomes, lock = [], threading.Lock()

    def send(index):
        probe_client = client(server, "grpc")
        bad = index % 4 == 0
        try:
            answer = probe_client.infer(nan_images(serve_images[:8]) if bad else serve_images[:8])
            outcome = ("ok", bad, answer)
        except Exception as error:  # noqa: BLE001 - the outcome is inspected below
            outcome = ("error", bad, str(error))
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == 12
    for kind, bad, value in outcomes:
        if kind == "ok":
            assert not bad
            assert_same(value, reference, ["pred", "probs", "detector_score"])
        else:
            assert "images contain NaN or Inf" in value
    assert all(kind == "error" for kind, bad, _ in outcomes if bad)
    assert_same(client(server, "http").infer(serve_images[:8]), reference, ["pred"])


def test_health_metadata_and_localhost_binding(server):
    import json
    import urllib.request

    base = f"http://127.0.0.1:{server.http_port}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/gradprobe/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as answer:
            assert answer.status == 200, path
    with urllib.request.urlopen(base + "/v2/models/gradprobe", timeout=10) as answer:
        metadata = json.load(answer)
    assert {i["name"]: i["shape"] for i in metadata["inputs"]} == {
        "images": [-1, 1, 28, 28], "contrast": [-1, 1], "maps": [-1, 1]}
    assert {"detector_score", "is_anomalous", "cam_map"} <= {o["name"] for o in metadata["outputs"]}
    assert client(server, "grpc").ready()
    listening = _listening_addresses()  # read from /proc, no traffic sent anywhere
    for port in (server.http_port, server.grpc_port):
        assert listening.get(port) == {"127.0.0.1"}, (port, listening.get(port))


def _listening_addresses() -> dict:
    import ipaddress

    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                text = str(ipaddress.IPv4Address(raw[::-1]))
            else:
                v6 = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                text = str(v6.ipv4_mapped or v6)  # gRPC listens on ::ffff:127.0.0.1
            found.setdefault(int(port, 16), set()).add(text)
    return found


def test_killed_server_fails_clients_fast_and_restart_serves(serve_bundle, serve_images, tmp_path):
    """SIGKILL the server mid-load: every client call ends with an error within its timeout (no hang);
    a new server on the same ports answers correctly again."""
    http_port, grpc_port = free_ports(2)
    server = ServerProcess(serve_bundle, http_port, grpc_port, tmp_path / "serve.log").start()
    reference = expected(serve_bundle, serve_images[:4])
    results, started, lock = [], threading.Barrier(5), threading.Lock()

    def load(protocol):
        probe_client = client(server, protocol, timeout=10)
        started.wait(timeout=60)
        for _ in range(400):  # bounded: ends at the first error or after 400 requests
            try:
                answer = probe_client.infer(serve_images[:4])
                assert_same(answer, reference, ["pred"])
            except AssertionError:
                raise
            except Exception as error:  # noqa: BLE001 - the failure is what this test wants to see
                with lock:
                    results.append(("error", protocol, type(error).__name__))
                return
        with lock:
            results.append(("finished", protocol, None))

    threads = [threading.Thread(target=load, args=(p,), daemon=True) for p in ("http", "grpc") * 2]
    try:
        for t in threads:
            t.start()
        started.wait(timeout=60)
        import time

        time.sleep(1.0)  # let requests flow
        server.kill()
        for t in threads:
            t.join(timeout=60)  # a bound on a hang, not a timing claim
        assert not any(t.is_alive() for t in threads), "a client hung after the server was killed"
        assert len(results) == 4 and all(kind == "error" for kind, _, _ in results), results
    finally:
        server.stop()
    try:
        server.wait_ports_free()
    except gradprobe.GradprobeError as error:
        pytest.fail(str(error))
    again = ServerProcess(serve_bundle, http_port, grpc_port, tmp_path / "serve-again.log").start()
    try:
        for protocol in PROTOCOLS:
            assert_same(client(again, protocol).infer(serve_images[:4]), reference)
    finally:
        again.stop()


def test_stub_interpreter_check(monkeypatch):
    """This venv's interpreter matches the libpython PyTriton's stub loads; another build is refused."""
    import platform

    from gradprobe.serve.triton import check_stub_interpreter

    check_stub_interpreter()
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.99")
    with pytest.raises(gradprobe.BackendUnavailableError, match="different build.*/usr/bin/python3"):
        check_stub_interpreter()
