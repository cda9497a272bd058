"""Without the [serve] / [scale] extras the commands say which extra to install; importing gradprobe
(or gradprobe.serve) loads neither PyTriton nor Ray. Runs in every venv (the extras are hidden here)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import gradprobe
from gradprobe import BackendUnavailableError

HIDE = {"serve": ("pytriton", "pytriton.triton"), "scale": ("ray", "ray.data", "pyarrow")}


@pytest.fixture
def without(monkeypatch):
    def hide(extra):
        for name in HIDE[extra]:
            monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError
    return hide


def test_serve_without_extra_names_it(without, tmp_path):
    from gradprobe.serve.triton import serve

    without("serve")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'gradprobe\[serve\]'"):
        serve(tmp_path)


def test_score_without_extra_names_it(without, tmp_path):
    from gradprobe.serve.scale import score

    without("scale")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'gradprobe\[scale\]'"):
        score(tmp_path, tmp_path, tmp_path / "out")


@pytest.mark.parametrize("extra, argv", [("serve", ["serve", "BUNDLE"]), ("scale", ["score", "B", "IN", "OUT"])])
def test_cli_without_extra(without, capsys, extra, argv):
    from gradprobe.cli import main

    without(extra)
    assert main(argv) == 2
    assert f"pip install 'gradprobe[{extra}]'" in capsys.readouterr().err


def test_import_loads_no_serving_stack():
    code = ("import gradprobe, gradprobe.serve, gradprobe.serve.triton, gradprobe.serve.scale, gradprobe.cli, sys; "
            "gradprobe.cli.build_parser(); "
            "print(sorted(m for m in ('pytriton', 'ray', 'pyarrow', 'tritonclient', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_output_adapter_names_every_output(serve_bundle, fmnist_test):
    from gradprobe.serve.outputs import output_specs, probe_outputs

    probe = gradprobe.load(serve_bundle)
    images = fmnist_test[0][:3]
    arrays = probe_outputs(probe.run(images), None, probe.explain(images))
    assert {"logits", "probs", "pred", "confounding_grad_sqnorm", "cam", "cam_map"} <= set(arrays)
    assert all(len(a) == 3 for a in arrays.values())
    specs = output_specs(probe, maps=True)
    assert specs["pred"] == (np.dtype(np.int64), ()) and specs["cam_map"][1] == (28, 28)
    assert {f"{name}_map" for name in probe.map_names} <= set(specs)  # every map of the bundle's table
    assert {"detector_score", "is_anomalous"} <= set(specs)
