import pytest

from gradprobe.fileio import atomic_directory, atomic_write_text


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "bundle") as directory:
            (directory / "probe.onnx").write_text("half")
            raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_old_bundle(tmp_path):
    with atomic_directory(tmp_path / "bundle") as directory:
        (directory / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "bundle") as directory:
            (directory / "a").write_text("new")
            raise RuntimeError
    assert (tmp_path / "bundle" / "a").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_file(tmp_path):
    atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
