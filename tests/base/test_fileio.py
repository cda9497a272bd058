"""Atomic writes, the writer lock, recovery after killed writers, confined reads of untrusted names."""
import os
import threading
import time

import pytest

from gradprobe.base.errors import BundleError
from gradprobe.base.fileio import (atomic_directory, atomic_write_text, check_plain_name, read_confined,
                                   recover_interrupted_writes, writer_lock)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "bundle") as directory:
            (directory / "probe.onnx").write_text("half")
            raise RuntimeError("export failed")
    assert _entries(tmp_path) == []


def test_failed_rewrite_keeps_old_bundle(tmp_path):
    with atomic_directory(tmp_path / "bundle") as directory:
        (directory / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "bundle") as directory:
            (directory / "a").write_text("new")
            raise RuntimeError
    assert (tmp_path / "bundle" / "a").read_text() == "old"
    assert _entries(tmp_path) == ["bundle"]


def test_rewrite_replaces_whole_directory(tmp_path):
    with atomic_directory(tmp_path / "bundle") as directory:
        (directory / "a").write_text("old")
        (directory / "only-old").write_text("x")
    with atomic_directory(tmp_path / "bundle") as directory:
        (directory / "a").write_text("new")
    assert _entries(tmp_path / "bundle") == ["a"] and (tmp_path / "bundle" / "a").read_text() == "new"
    assert _entries(tmp_path) == ["bundle"]


def test_atomic_file(tmp_path):
    atomic_write_text(tmp_path / "x.json", "{}")
    assert (tmp_path / "x.json").read_text() == "{}"
    assert _entries(tmp_path) == ["x.json"]


def test_recovery_restores_a_swap_cut_between_its_renames_and_removes_stale_temporaries(tmp_path):
    old = tmp_path / ".bundle.old-999999"
    old.mkdir()
    (old / "a").write_text("old")
    (tmp_path / ".bundle.abc.tmp").mkdir()                # a killed writer's half-written folder
    recover_interrupted_writes(tmp_path / "bundle")
    assert (tmp_path / "bundle" / "a").read_text() == "old"
    assert _entries(tmp_path) == ["bundle"]


def test_writer_lock_serialises_and_times_out_with_a_clear_error(tmp_path):
    target = tmp_path / "bundle"
    held = threading.Event()
    release = threading.Event()

    def hold():
        with writer_lock(target):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    started = time.monotonic()
    with pytest.raises(BundleError, match="being written by another process"):
        with writer_lock(target, timeout=0.3):
            pass
    assert time.monotonic() - started >= 0.3
    release.set()
    thread.join()
    with writer_lock(target, timeout=1):
        pass


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "..", ".", "", ".hidden", "a\\b", "a\0b", 3, None])
def test_names_that_are_not_plain_are_refused(name):
    with pytest.raises(BundleError):
        check_plain_name(name)


def test_confined_read_refuses_symlinks_fifos_folders_and_wrong_sizes(tmp_path):
    (tmp_path / "real").write_bytes(b"12345")
    assert read_confined(tmp_path, "real", max_bytes=10, expected_bytes=5) == b"12345"
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    cases = {"link": "symbolic link", "zero": "symbolic link", "fifo": "not a regular file",
             "folder": "not a regular file", "missing": "missing"}
    for name, message in cases.items():
        with pytest.raises(BundleError, match=message):
            read_confined(tmp_path, name, max_bytes=10)
    with pytest.raises(BundleError, match="more than the 4 allowed"):
        read_confined(tmp_path, "real", max_bytes=4)
    with pytest.raises(BundleError, match="manifest lists 6"):
        read_confined(tmp_path, "real", max_bytes=10, expected_bytes=6)
