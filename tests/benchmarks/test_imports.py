"""The harness stays out of the installed package, and importing it loads neither torch nor onnxruntime."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from benchmarks.harness.peers import CHECKOUT

INSTALLED = ("sdk", "export", "runtime", "kernels")


def test_harness_import_loads_no_torch_or_onnxruntime():
    code = ("import sys, benchmarks.harness, benchmarks.harness.timing, benchmarks.harness.peers, benchmarks.cli; "
            "loaded = [m for m in ('torch', 'onnxruntime') if m in sys.modules]; print(loaded); sys.exit(bool(loaded))")
    done = subprocess.run([sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_installed_package_has_no_harness():
    for name in ("gradprobe.bench", "gradprobe.evaluate"):
        assert importlib.util.find_spec(name) is None, name
    for folder in INSTALLED:
        for path in (CHECKOUT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "benchmarks.harness" not in text and "benchmarks/peers" not in text and "benchmarks/results" \
                not in text, path
