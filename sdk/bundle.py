"""The bundle directory: probe.onnx + manifest.json (+ model weights); reading it back safely."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import BundleError

FORMAT = "gradprobe-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "probe.onnx"
SCORE_ORIENTATION = "higher means more anomalous"


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict:
    return {"sha256": sha256(path), "bytes": path.stat().st_size}


def read_manifest(bundle: str | os.PathLike) -> dict:
    """Load and check a bundle's manifest and files; raise BundleError saying what is wrong."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise BundleError(f"bundle {bundle} does not exist; create one with gradprobe.export(model, example, path)")
    if not bundle.is_dir():
        kind = "an ONNX file" if bundle.suffix == ".onnx" else "a file"
        raise BundleError(f"{bundle} is {kind}, not a gradprobe bundle: a bundle is a directory holding "
                          f"{PROBE} and {MANIFEST}, written by gradprobe.export")
    manifest_path = bundle / MANIFEST
    if not manifest_path.exists():
        raise BundleError(f"bundle {bundle} has no {MANIFEST}: it is incomplete or not a gradprobe bundle")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{manifest_path} is not valid JSON ({error}); the bundle is corrupt") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path} is not a gradprobe manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise BundleError(f"{manifest_path} has schema_version {version!r}, newer than this gradprobe "
                          f"understands ({SCHEMA_VERSION}); upgrade gradprobe to load it")
    for name, record in manifest.get("files", {}).items():
        path = bundle / name
        if not path.exists():
            raise BundleError(f"bundle {bundle} is missing {name} (listed in its manifest)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(f"{path} has {size} bytes but the manifest expects {record['bytes']}: "
                              "the file is truncated or was replaced")
        if sha256(path) != record["sha256"]:
            raise BundleError(f"{path} does not match the sha256 in the manifest: the file was modified or "
                              "replaced by a foreign model")
    if PROBE not in manifest.get("files", {}):
        raise BundleError(f"{manifest_path} lists no {PROBE}")
    return manifest


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write manifest.json atomically: readers see the old manifest or the new one, never half of it."""
    from .fileio import atomic_write_text

    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def update_manifest(bundle: str | os.PathLike, key: str, section, new_files: dict | None = None,
                    remove: tuple = ()) -> dict:
    """Set ``manifest[key] = section`` and add ``new_files`` {name: bytes}, atomically, in a readable order.

    New files are written first (under names the manifest does not yet list), then the manifest is
    replaced by an atomic rename, then the files in ``remove`` are deleted: a crash at any point leaves
    a bundle whose manifest matches its files (at worst with a stray unlisted file).
    """
    from .fileio import atomic_write_bytes

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    for name, data in (new_files or {}).items():
        if name in manifest["files"]:
            raise BundleError(f"{bundle} already lists {name}; new files need fresh names")
        atomic_write_bytes(bundle / name, data)
        manifest["files"][name] = file_record(bundle / name)
    for name in remove:
        manifest["files"].pop(name, None)
    manifest[key] = section
    write_manifest(bundle, manifest)
    for name in remove:
        if name not in manifest["files"] and (bundle / name).exists():
            (bundle / name).unlink()
    return manifest
