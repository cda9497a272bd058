"""The one peers runner: find the peers venv's python, run a script of ``benchmarks/peers/`` there, parse its result.

The peer libraries (pytorch-grad-cam, pytorch-ood, Captum) need torchvision, which the main venv does
not have; they live in a second venv (``make peers``). A peer script takes a JSON spec file as its last
argument and prints its result as the last JSON line of its stdout. A missing venv or a bundle the
peers cannot rebuild is ``PeersUnavailable`` (a skip, with the reason); a script that fails is
``PeersFailed`` (an error, with the end of its stderr).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from gradprobe.base.errors import GradprobeError

#: The source checkout this harness belongs to, and its peer scripts.
CHECKOUT = Path(__file__).resolve().parents[2]
SCRIPTS = CHECKOUT / "benchmarks" / "peers"
PEERS_ENV = "GRADPROBE_PEERS_PYTHON"


class PeersUnavailable(GradprobeError):
    """The peers cannot run here (no venv, or nothing they can load); the message says why and how to fix."""


class PeersFailed(GradprobeError):
    """A peer script ran and failed, or printed no JSON result."""


def find_peers_python(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` if given, else ``$GRADPROBE_PEERS_PYTHON``, else ``<checkout>/.venv-peers/bin/python``.

    A path that was asked for and does not exist is refused, never silently replaced by another.
    """
    if explicit:
        path, origin = Path(explicit), "--peers-python"
    elif os.environ.get(PEERS_ENV):
        path, origin = Path(os.environ[PEERS_ENV]), f"${PEERS_ENV}"
    else:
        path = CHECKOUT / ".venv-peers" / "bin" / "python"
        if not path.exists():
            raise PeersUnavailable(f"peers venv .venv-peers not found in {CHECKOUT}: run `make peers` "
                                   f"(or set ${PEERS_ENV} / --peers-python)")
        return path
    if not path.exists():
        raise PeersUnavailable(f"peers python {path} (from {origin}) does not exist")
    return path


def model_spec(bundle: str | os.PathLike, threads: int = 2) -> dict:
    """What a peer script needs to rebuild a bundle's model: checkpoint path, target layer, normalisation."""
    from gradprobe.base.bundle import Bundle

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    if not manifest.model.weights:
        raise PeersUnavailable(f"bundle {bundle} has no model weights (model.safetensors): the peers cannot "
                               "rebuild its model; export a gradprobe reference model")
    opened.read(manifest.model.weights)  # checked against its sha256 before another process loads it
    return {"checkpoint": str(opened.path.resolve() / manifest.model.weights),
            "target_layer": manifest.classifier.target_layer,
            "normalize": {"mean": list(manifest.input.mean), "std": list(manifest.input.std)},
            "threads": threads}


def last_json_line(stdout: str) -> dict:
    """The last line of ``stdout`` that is a JSON object (scripts may print progress before it)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise PeersFailed(f"no JSON result line on stdout: {stdout[-300:]!r}")


def run_peer(script: str | os.PathLike, spec: dict, *arguments: str, python: str | os.PathLike | None = None,
             threads: int = 2, timeout: float = 3600) -> dict:
    """Run ``python SCRIPT [ARGUMENTS...] SPEC.json`` and return the JSON result it printed last.

    ``script``: a name under ``benchmarks/peers/`` or a path. ``python``: default ``find_peers_python()``.
    """
    path = Path(script)
    if not path.is_absolute():
        path = SCRIPTS / path
    if not path.is_file():
        raise PeersFailed(f"peer script {path} does not exist")
    python = find_peers_python(python)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory(prefix="gradprobe-peers-") as folder:
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        try:
            done = subprocess.run([str(python), str(path), *arguments, str(spec_path)], capture_output=True,
                                  text=True, timeout=timeout, env=env, cwd=CHECKOUT)
        except subprocess.TimeoutExpired as error:
            raise PeersFailed(f"{path.name} did not finish within {timeout:g} s") from error
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise PeersFailed(f"{path.name} exited with {done.returncode} under {python}: {tail[-1500:]}")
    return last_json_line(done.stdout)
