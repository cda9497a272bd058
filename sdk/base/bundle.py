"""A bundle directory on disk: read it without trusting it, write it atomically, update it under a lock.

``Bundle.open(path)`` validates the manifest and checks every listed file (a regular file of the listed
size, never a symlink, FIFO or folder; one ``lstat`` each); ``bundle.read(name)``
returns a file's bytes after checking its size and sha256 (read once, so what was checked is what
is used). ``write_bundle`` creates or replaces a whole bundle; ``update_bundle`` changes one in place
(calibration) without ever leaving it unloadable.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

from .errors import BundleError
from .fileio import (atomic_directory, atomic_write_bytes, check_confined, check_plain_name, interrupted_swap,
                     read_confined, writer_lock)
from .manifest import MANIFEST, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, FileRecord, Manifest

#: Name prefixes of files that updates replace (a detector, a TensorRT engine, a head graph): an update deletes
#: the ones the new manifest no longer points at.
REPLACEABLE = ("detector-", "engine-", "head-")
#: A reader that meets a bundle mid-update (a listed file just replaced) retries this often.
READ_ATTEMPTS = 3


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(data: bytes) -> FileRecord:
    return FileRecord(sha256_hex(data), len(data))


def _parse_manifest(raw: bytes, where: Path) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=lambda name: name)  # NaN/Infinity stay strings
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, 4300+ digit integers
        raise BundleError(f"{where / MANIFEST} is not valid JSON ({str(error)[:200]}); the bundle is corrupt") from error
    try:
        return Manifest.from_json(data)
    except BundleError as error:
        raise BundleError(f"{where}: {error}") from None


class Bundle:
    """An opened bundle: its validated manifest and confined, verified access to its files.

    Opening never writes, except to put back a bundle that a writer killed between the two renames of
    a fallback swap left beside its path (under the writer lock).
    """

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        path = Path(path)
        if interrupted_swap(path) is not None:
            _restore(path)
        if not path.exists():
            raise BundleError(f"bundle {path} does not exist; create one with gradprobe.export(model, example, path)")
        if not path.is_dir():
            kind = "an ONNX file" if path.suffix == ".onnx" else "a file"
            raise BundleError(f"{path} is {kind}, not a gradprobe bundle: a bundle is a directory holding "
                              f"{MANIFEST} and its graph, written by gradprobe.export")
        if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
            raise BundleError(f"bundle {path} has no {MANIFEST}: it is incomplete or not a gradprobe bundle")
        manifest = _parse_manifest(read_confined(path, MANIFEST, max_bytes=MAX_MANIFEST_BYTES), path)
        for name, record in manifest.files.items():
            check_confined(path, name, max_bytes=MAX_FILE_BYTES, expected_bytes=record.bytes)
        return cls(path, manifest)

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, checked against the manifest's size and sha256."""
        record = self.manifest.files.get(name)
        if record is None:
            raise BundleError(f"{self.path}: {name!r} is not listed in the manifest")
        data = read_confined(self.path, name, max_bytes=MAX_FILE_BYTES, expected_bytes=record.bytes)
        if sha256_hex(data) != record.sha256:
            raise BundleError(f"{self.path / name} does not match the sha256 in the manifest: the file was modified "
                              "or replaced by a foreign one")
        return data


def _restore(path: Path) -> None:
    """Put back the bundle a writer killed mid-swap left beside ``path`` (under the writer lock, which
    waits for a live writer and restores what a dead one left), so a load finds the old or the new one."""
    old = interrupted_swap(path)
    if not os.access(path.parent, os.W_OK):
        raise BundleError(f"bundle {path} is missing: a write was interrupted and left the previous version in "
                          f"{old}; rename it back to {path.name} or run any gradprobe write with write access")
    with writer_lock(path):
        pass


def open_and_read(path: str | os.PathLike, names: Callable[[Manifest], list[str]]) -> tuple[Bundle, dict]:
    """Open a bundle and read the files ``names(manifest)`` asks for, as one consistent snapshot.

    A concurrent in-place update replaces the manifest before it deletes the files it no longer lists,
    and a whole rewrite swaps the directory: a reader that fails while the manifest changed under it just
    met such a write, and reads again. A failure on an unchanged manifest is the bundle's own.
    """
    for attempt in range(READ_ATTEMPTS):
        before = _manifest_stamp(path)
        try:
            bundle = Bundle.open(path)
            return bundle, {name: bundle.read(name) for name in names(bundle.manifest)}
        except BundleError:
            unchanged = before is not None and _manifest_stamp(path) == before
            if attempt == READ_ATTEMPTS - 1 or unchanged:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _manifest_stamp(path: str | os.PathLike) -> tuple | None:
    """Identity of the manifest file now at ``path`` (a write always puts a new file there), or None."""
    try:
        info = os.stat(Path(path) / MANIFEST, follow_symlinks=False)
    except OSError:
        return None
    return info.st_ino, info.st_dev, info.st_mtime_ns, info.st_size


def _manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest as written, after checking that ``Manifest.from_json`` accepts it: a writer never leaves
    a bundle that its readers would refuse."""
    try:
        text = json.dumps(manifest.to_json(), indent=2, allow_nan=False) + "\n"
    except ValueError as error:
        raise BundleError(f"refusing to write a manifest holding a non-finite number ({error})") from None
    try:
        Manifest.from_json(json.loads(text))
    except BundleError as error:
        raise BundleError(f"refusing to write an invalid manifest: {error}") from None
    return text.encode("utf-8")


def write_bundle(path: str | os.PathLike, manifest: Manifest, files: dict[str, bytes],
                 write_extra: Callable[[Path], dict[str, bytes]] | None = None) -> Path:
    """Create or replace the whole bundle at ``path``: files and manifest in a temporary folder, one swap.

    ``manifest.files`` is filled in from ``files``; ``write_extra(folder)`` may add files made in place.
    """
    path = Path(path)
    with atomic_directory(path) as folder:
        files = dict(files)
        if write_extra is not None:
            files.update(write_extra(folder))
        for name, data in files.items():
            (folder / name).write_bytes(data)
        manifest = dataclasses.replace(manifest, files={name: file_record(data) for name, data in files.items()})
        (folder / MANIFEST).write_bytes(_manifest_bytes(manifest))
    return path


def update_bundle(path: str | os.PathLike, change: Callable[[Manifest], Manifest],
                  new_files: dict[str, bytes] | None = None, timeout: float | None = None) -> Manifest:
    """Change a bundle in place under its writer lock; returns the manifest now on disk.

    Under the lock the current manifest is read again (never one read earlier) and changed; only once the
    new manifest is valid are the new files written, under fresh names (a name already listed with the
    same content is kept as it is), then the manifest is swapped, and only then are files deleted that
    the old manifest listed and the new one does not: a kill at any point leaves a loadable bundle, and
    the next update removes what a killed one left.
    """
    path = Path(path)
    new_files = dict(new_files or {})
    with writer_lock(path, timeout):
        current = Bundle.open(path).manifest
        for name in sorted(new_files):
            check_plain_name(name, "new bundle file")
            if name in current.files and current.files[name] != file_record(new_files[name]):
                raise BundleError(f"{path} already lists a different {name}; new files need fresh names")
        files = {**current.files, **{name: file_record(data) for name, data in new_files.items()}}
        updated = change(dataclasses.replace(current, files=files))
        updated = dataclasses.replace(updated, files={name: files[name] for name in _referenced(updated, files)})
        text = _manifest_bytes(updated)  # checked before anything is written
        for name, data in new_files.items():
            if name not in current.files:
                atomic_write_bytes(path / name, data)
        atomic_write_bytes(path / MANIFEST, text)
        for name in set(current.files) - set(updated.files):
            (path / name).unlink(missing_ok=True)
        for stray in (stray for prefix in REPLACEABLE for stray in path.glob(f"{prefix}*")):  # killed writers' files
            if stray.name not in updated.files and (stray.is_symlink() or stray.is_file()):
                stray.unlink(missing_ok=True)  # a symlink itself, never what it points at
    return updated


def _referenced(manifest: Manifest, files: dict) -> list[str]:
    """Files to keep listed: every file except replaceable ones (detectors, engines, heads) that the manifest no
    longer points at."""
    active = {manifest.detector.file} if manifest.detector else set()
    active |= {engine.file for engine in manifest.engines} | {head.file for head in manifest.heads}
    return [name for name in files if not name.startswith(REPLACEABLE) or name in active]
