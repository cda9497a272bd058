"""``calibrate`` never reads or deletes a file outside its bundle, whatever the manifest on disk says.

The manifest is damaged after the probe was loaded (the update re-reads it under the lock), so the checks
that matter are the writer's own. One subprocess runs every scenario with a Python audit hook recording
each ``open``, ``os.remove``, ``os.rename`` and ``shutil.rmtree`` under the test folder; victim files
beside the bundle must survive, untouched and unopened.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="calibrating fits a detector with scikit-learn")
pytestmark = pytest.mark.timeout(300)

SCRIPT = textwrap.dedent('''
    import json, os, shutil, sys
    from pathlib import Path
    import gradprobe
    from gradprobe.base.bundle import file_record
    from tests.sdk.bundle_workers import images

    source, root = Path(sys.argv[1]), Path(sys.argv[2])
    victim, deep_victim = root / "victim.txt", root / "victim" / "victim.txt"
    touched = []

    def hook(event, args):
        if event in ("open", "os.remove", "os.rename", "os.replace", "shutil.rmtree", "os.rmdir") and args \\
                and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(str(root)):
                touched.append((event, path))

    def manifest_edit(bundle, change):
        data = json.loads((bundle / "manifest.json").read_text())
        change(data)
        (bundle / "manifest.json").write_text(json.dumps(data))

    def point_detector_at(name, record_of):
        def change(data):
            data["files"][name] = file_record(record_of.read_bytes()).to_json()
            data["detector"]["file"] = name
        return change

    def list_only(name, record_of):
        return lambda data: data["files"].update({name: file_record(record_of.read_bytes()).to_json()})

    def replace_listed_by_link(bundle):
        listed = bundle / json.loads((bundle / "manifest.json").read_text())["detector"]["file"]
        listed.unlink()
        listed.symlink_to(victim)

    def stray_link(bundle):
        (bundle / "detector-0000000000000000.npz").symlink_to(victim)
        (bundle / "detector-0000000000000001.npz").symlink_to("../victim.txt")

    scenarios = {
        "detector.file=../victim.txt": lambda b: manifest_edit(b, point_detector_at("../victim.txt", victim)),
        "detector.file=absolute": lambda b: manifest_edit(b, point_detector_at(str(victim), victim)),
        "detector.file=../victim/victim.txt": lambda b: manifest_edit(b, point_detector_at("../victim/victim.txt",
                                                                                         deep_victim)),
        "files-key=../../victim": lambda b: manifest_edit(b, list_only("../victim/victim.txt", deep_victim)),
        "files-key=absolute": lambda b: manifest_edit(b, list_only(str(victim), victim)),
        "listed-detector=symlink-to-victim": replace_listed_by_link,
        "stray-detector-symlinks-to-victim": stray_link,
    }
    results = {}
    sys.addaudithook(hook)
    for number, (name, damage) in enumerate(scenarios.items()):
        bundle = root / f"bundle-{number}"
        shutil.copytree(source, bundle)
        probe = gradprobe.load(bundle)
        damage(bundle)
        touched.clear()
        try:
            probe.calibrate(images(number), kind="ood-free", seed=number)
            outcome = "calibrated"
        except gradprobe.GradprobeError as error:
            outcome = f"{type(error).__name__}: {error}"
        allowed = {str(root / f".{bundle.name}.lock"), str(root)}  # the lock, and filelock's O_TMPFILE probe
        outside = [(event, path) for event, path in touched
                   if not path.startswith(str(bundle) + os.sep) and (path not in allowed or event != "open")]
        results[name] = {"outcome": outcome, "outside": outside,
                         "victims": [victim.read_text(), deep_victim.read_text()]}
    print(json.dumps(results))
''')

#: scenario -> what calibrate must answer (a BundleError naming the problem, or success)
EXPECTED = {
    "detector.file=../victim.txt": r"BundleError: .*(files key|detector\.file)",
    "detector.file=absolute": r"BundleError: .*(files key|detector\.file)",
    "detector.file=../victim/victim.txt": r"BundleError: .*(files key|detector\.file)",
    "files-key=../../victim": "BundleError: .*files key",
    "files-key=absolute": "BundleError: .*files key",
    "listed-detector=symlink-to-victim": "BundleError: .*symbolic link",
    "stray-detector-symlinks-to-victim": "calibrated",
}


def test_calibrate_touches_nothing_outside_the_bundle(bundles, tmp_path):
    import re

    root = tmp_path / "root"
    (root / "victim").mkdir(parents=True)
    (root / "victim.txt").write_text("precious")
    (root / "victim" / "victim.txt").write_text("also precious")
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(bundles["calibrated"]), str(root)], cwd=repo,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(results) == set(EXPECTED)
    for name, result in results.items():
        assert re.match(EXPECTED[name], result["outcome"]), (name, result["outcome"])
        assert result["outside"] == [], (name, result["outside"])
        assert result["victims"] == ["precious", "also precious"], name
    assert (root / "victim.txt").read_text() == "precious"
    assert not any(path.is_symlink() for path in (root / "bundle-6").iterdir())  # the stray links, not their target
    shutil.rmtree(root)
