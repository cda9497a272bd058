"""The command line end to end on the shipped checkpoint and real Fashion-MNIST."""
import subprocess
import sys

import gradprobe
from gradprobe.cli import main

def test_export_and_info(tmp_path, capsys):
    assert main(["export", "resnet-fmnist", "--out", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "layer4" in printed and "Ankle boot" in printed and "TensorRT parser problems: none" in printed
    assert main(["info", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "label_grad_sqnorm" in printed and "gradcam_pp" in printed and "Grad-CAM++" in printed

def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "resnet18", "--out", str(tmp_path / "b")]) == 2
    assert "untrained preset" in capsys.readouterr().err

def test_train_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "tiny.safetensors"
    assert main(["train", "--arch", "resnet-tiny", "--epochs", "1", "--limit", "512", "--out", str(out)]) == 0
    model = gradprobe.models.load_checkpoint(out)
    assert model.config["widths"] == [8, 16, 32, 64] and not model.training
    meta = gradprobe.models.read_metadata(out)
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["trained_with"].startswith("gradprobe train")

def test_demo_runs_and_draws(tmp_path):
    """`gradprobe demo` on real data: accuracy of the shipped model and the explanation picture."""
    out = subprocess.run([sys.executable, "-m", "gradprobe.cli", "demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.split("accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    png = (tmp_path / "explanations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def test_train_gradcon_quick_writes_a_calibrated_bundle(tmp_path, capsys):
    import json

    out, bundle = tmp_path / "gradcon.safetensors", tmp_path / "bundle"
    assert main(["train-gradcon", "--normal-class", "7", "--quick", "--out", str(out), "--bundle", str(bundle),
                 "--outlier-percent", "10"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["normal_class"] == 7 and record["steps"] > 0 and record["bundle"] == str(bundle)
    meta = gradprobe.models.read_metadata(out)
    assert meta["trained_with"].startswith("gradprobe train-gradcon --normal-class 7") and meta["normal_class"] == 7
    assert main(["info", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "GradCon anomaly detector of class 7" in printed and "threshold" in printed and "max_f1" in printed
