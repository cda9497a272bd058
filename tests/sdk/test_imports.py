"""The deployed path needs numpy + the runtime only: importing gradprobe must not import torch."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("statement", [
    "import gradprobe",
    "import gradprobe.runtime",
    "import gradprobe, gradprobe.runtime, gradprobe.data, gradprobe.base.bundle, gradprobe.probe, gradprobe.detect, "
    "gradprobe.explain, gradprobe.kernels, gradprobe.cli, gradprobe.gradcon",
])
def test_import_does_not_load_torch(statement):
    code = f"{statement}; import sys; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_runtime_runs_a_bundle_without_torch(bundles, fmnist_test, tmp_path):
    import numpy as np

    bundle = bundles["deep"]
    np.save(tmp_path / "x.npy", fmnist_test[0][:2])
    code = (f"import sys, numpy as np, gradprobe; r = gradprobe.load({str(bundle)!r}).run(np.load({str(tmp_path / 'x.npy')!r}));"
            "print(r.pred.shape, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(2,) False"
