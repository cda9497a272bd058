"""gradprobe and its runtime make no network calls of their own (issue 10, item 7).

One subprocess imports gradprobe, loads a calibrated bundle, runs, explains and detects, with a Python
audit hook that records every ``socket.*`` event (creation, connect, name lookups); a second run under
``strace -f -e trace=network`` also sees the native threads of ONNX Runtime, which Python cannot.
"""
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import json, sys
    events = []
    sys.addaudithook(lambda event, args: events.append([event, repr(args)[:200]])
                     if event.startswith(("socket.", "http.", "urllib.", "ftplib.", "smtplib.")) else None)
    import numpy as np
    import gradprobe
    probe = gradprobe.load(sys.argv[1])
    images = np.linspace(0, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28)
    probe.run(images)
    probe.explain(images, [[0, 1], [2, 3]])
    detected = probe.detect(images)
    print(json.dumps({"events": events, "detected": len(detected)}))
''')


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=280)


def test_no_socket_events_from_python(bundles):
    run = _run([sys.executable, "-c", SCRIPT, str(bundles["calibrated"])])
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"events": [], "detected": 2}


def test_no_internet_sockets_from_any_thread(bundles, tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace): native threads not checked")
    trace = tmp_path / "network.strace"
    run = _run([strace, "-f", "-qq", "-e", "trace=network", "-o", str(trace), sys.executable, "-c", SCRIPT,
                str(bundles["calibrated"])])
    if run.returncode != 0 and "ptrace" in run.stderr:
        pytest.skip(f"strace cannot trace here: {run.stderr.strip()[:200]}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["events"] == []
    calls = [line for line in trace.read_text().splitlines() if re.search(r"\b(socket|connect|sendto|sendmsg)\(", line)]
    internet = [line for line in calls if "AF_INET" in line or "sin_port" in line or "sin6_port" in line]
    assert internet == [], internet[:10]
    assert calls == [], f"network syscalls (no internet family, but unexpected): {calls[:10]}"


def test_onnxruntime_telemetry_is_switched_off_before_a_session_exists(bundles, monkeypatch):
    """Belt and braces: ONNX Runtime's telemetry switch (a Windows ETW provider; a no-op on Linux) is set off."""
    ort = pytest.importorskip("onnxruntime")
    calls = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"), raising=False)
    import gradprobe

    gradprobe.load(bundles["plain"]).close()
    assert calls and calls[0] == "off"
