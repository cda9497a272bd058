"""Bundle reading and in-place updates on a real bundle: the guarantees the lock and kill tests rely on."""
import dataclasses
import os
import shutil

import pytest

from gradprobe.base.bundle import Bundle, open_and_read, update_bundle
from gradprobe.base.errors import BundleError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def bundle(bundles, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundles["calibrated"], target)
    return target


def test_open_puts_back_a_bundle_a_killed_fallback_swap_left_aside(bundle):
    """Killed between the two renames of the fallback swap: the next load restores the previous version."""
    os.replace(bundle, bundle.parent / f".{bundle.name}.old-4242")
    (bundle.parent / f".{bundle.name}.x1y2.tmp").mkdir()  # the new version, half written
    assert Bundle.open(bundle).manifest.detector is not None
    assert sorted(p.name for p in bundle.parent.iterdir()) == [f".{bundle.name}.lock", bundle.name]


def test_update_checks_the_new_manifest_before_writing_anything(bundle):
    before = sorted(p.name for p in bundle.iterdir())

    def bad(manifest):
        return dataclasses.replace(manifest, detector=dataclasses.replace(manifest.detector, threshold=float("nan")))

    with pytest.raises(BundleError, match="non-finite|threshold"):
        update_bundle(bundle, bad, {"detector-ffffffffffffffff.npz": b"new"})
    with pytest.raises(BundleError, match="not a plain file name"):
        update_bundle(bundle, lambda manifest: manifest, {"../escaped.npz": b"new"})
    assert sorted(p.name for p in bundle.iterdir()) == before and not (bundle.parent / "escaped.npz").exists()


def test_update_removes_stray_detector_files_and_links_but_not_folders_or_link_targets(bundle, tmp_path):
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"keep")
    (bundle / "detector-0000000000000000.npz").write_bytes(b"left by a killed writer")
    (bundle / "detector-0000000000000001.npz").symlink_to(victim)
    (bundle / "detector-folder").mkdir()
    update_bundle(bundle, lambda manifest: manifest)
    assert not (bundle / "detector-0000000000000000.npz").exists()
    assert not (bundle / "detector-0000000000000001.npz").is_symlink() and victim.read_bytes() == b"keep"
    assert (bundle / "detector-folder").is_dir()


def test_a_reader_that_meets_an_update_reads_again(bundle, monkeypatch):
    """The first read fails because an update swapped the manifest under it: the snapshot is retried."""
    from gradprobe.base import bundle as module

    calls = []
    real_read = Bundle.read

    def read_during_update(self, name):
        if not calls:
            calls.append(name)
            update_bundle(self.path, lambda manifest: dataclasses.replace(manifest, detector=None))
            raise BundleError("the file changed under the reader")
        return real_read(self, name)

    monkeypatch.setattr(module.Bundle, "read", read_during_update)
    opened, files = open_and_read(bundle, lambda manifest: [manifest.graph])
    assert opened.manifest.detector is None and list(files) == ["probe.onnx"] and len(calls) == 1


def test_a_failure_on_an_unchanged_bundle_is_not_retried(bundle, monkeypatch):
    from gradprobe.base import bundle as module

    calls = []

    def broken(self, name):
        calls.append(name)
        raise BundleError("damaged")

    monkeypatch.setattr(module.Bundle, "read", broken)
    with pytest.raises(BundleError, match="damaged"):
        open_and_read(bundle, lambda manifest: [manifest.graph])
    assert len(calls) == 1
