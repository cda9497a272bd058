"""Engine records in the manifest: strictly validated like every other field, written with the bundle's writer."""
import copy
import json
import shutil

import pytest

from gradprobe import BundleError
from gradprobe.base.bundle import Bundle, update_bundle
from gradprobe.base.manifest import Manifest

SHA = "ab" * 32
ENGINE = {"file": "engine-0123456789abcdef.plan", "tensorrt": "11.4.0.106", "gpu": "NVIDIA H200",
          "compute_capability": [9, 0], "precision": "fp16", "profile": {"min": 1, "opt": 32, "max": 256},
          "workspace_mib": None, "graph_sha256": SHA, "built": "2026-11-29T00:00:00Z"}


@pytest.fixture(scope="module")
def with_engine(bundles):
    data = json.loads((bundles["deep"] / "manifest.json").read_text())
    data["files"][ENGINE["file"]] = {"sha256": SHA, "bytes": 3}
    data["engines"] = [copy.deepcopy(ENGINE)]
    return data


def test_engine_records_round_trip(with_engine):
    manifest = Manifest.from_json(copy.deepcopy(with_engine))
    (engine,) = manifest.engines
    assert engine.profile == (1, 32, 256) and engine.compute_capability == (9, 0) and engine.precision == "fp16"
    assert manifest.to_json()["engines"] == [ENGINE]
    assert engine.key == ("11.4.0.106", "NVIDIA H200", (9, 0), "fp16", (1, 32, 256))


DAMAGES = [
    ("file", "../engine-0123456789abcdef.plan", "not a plain file name"),
    ("file", "engine.plan", "engines[0].file"),
    ("tensorrt", "eleven", "engines[0].tensorrt"),
    ("compute_capability", [9], "a list of 2 items"),
    ("precision", "int8", "one of ['fp32', 'fp16']"),
    ("profile", {"min": 8, "opt": 4, "max": 16}, "min <= opt <= max"),
    ("profile", {"min": 1, "max": 16}, "exactly min, opt and max"),
    ("profile", {"min": 0, "opt": 4, "max": 16}, "engines[0].profile.min"),
    ("graph_sha256", "xyz", "engines[0].graph_sha256"),
    ("workspace_mib", -1, "engines[0].workspace_mib"),
    ("gpu", 7, "engines[0].gpu"),
    ("calibrator", "int8.cache", "only the keys"),
]


@pytest.mark.parametrize(("field", "value", "words"), DAMAGES, ids=[f"{f}={str(v)[:16]}" for f, v, _ in DAMAGES])
def test_every_malformed_engine_field_is_named(with_engine, field, value, words):
    data = copy.deepcopy(with_engine)
    data["engines"][0][field] = value
    with pytest.raises(BundleError, match=None) as caught:
        Manifest.from_json(data)
    assert words in str(caught.value)


def test_engines_must_be_listed_files_one_per_key(with_engine):
    data = copy.deepcopy(with_engine)
    del data["files"][ENGINE["file"]]
    with pytest.raises(BundleError, match=r"engines\[0\].file.*not listed in files"):
        Manifest.from_json(data)
    data = copy.deepcopy(with_engine)
    data["engines"].append({**ENGINE, "file": "engine-fedcba9876543210.plan"})
    data["files"]["engine-fedcba9876543210.plan"] = {"sha256": SHA, "bytes": 3}
    with pytest.raises(BundleError, match="one engine per"):
        Manifest.from_json(data)


def test_update_drops_the_files_of_replaced_engines(bundles, tmp_path):
    import dataclasses

    from gradprobe.base.bundle import file_record
    from gradprobe.base.manifest import EngineRecord

    path = tmp_path / "deep"
    shutil.copytree(bundles["deep"], path)
    first = EngineRecord.from_json({**ENGINE, "file": "engine-00000000000000aa.plan"}, "e")
    second = dataclasses.replace(first, file="engine-00000000000000bb.plan")
    update_bundle(path, lambda m: dataclasses.replace(m, engines=(first,)), {first.file: b"one"})
    assert Bundle.open(path).read(first.file) == b"one"
    (path / "engine-00000000000000cc.plan").write_bytes(b"left by a killed writer")
    manifest = update_bundle(path, lambda m: dataclasses.replace(m, engines=(second,)), {second.file: b"two"})
    assert manifest.engines == (second,) and first.file not in manifest.files
    assert manifest.files[second.file] == file_record(b"two")
    assert not (path / first.file).exists() and not (path / "engine-00000000000000cc.plan").exists()
    assert Bundle.open(path).manifest.engines == (second,)
