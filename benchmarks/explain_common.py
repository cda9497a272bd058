"""Shared by the explanation benchmarks: the peers-venv subprocess and result files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PEERS_SCRIPT = ROOT / "benchmarks" / "peers" / "explain_peers.py"
sys.path.insert(0, str(ROOT))  # run from a source checkout


def peers_python() -> Path | None:
    """The peers venv's python ($GRADPROBE_PEERS_PYTHON or the checkout's .venv-peers); None when missing."""
    from gradprobe.bench import find_peers_python

    return find_peers_python(root=ROOT)[0]


def peer_spec(bundle, threads: int = 2) -> dict:
    """What the peers need to rebuild the bundle's model: weights, target layer, normalisation."""
    from gradprobe.bundle import read_manifest

    manifest = read_manifest(bundle)
    if not manifest["model"].get("weights"):
        raise SystemExit(f"{bundle} has no model.safetensors: the peers cannot rebuild its model")
    return {"checkpoint": str(Path(bundle).resolve() / manifest["model"]["weights"]), "threads": threads,
            "target_layer": manifest["target_layer"]["name"], "normalize": manifest["input"]["normalize"]}


def run_peers(mode: str, spec: dict, folder: Path, threads: int = 2, timeout: float = 3600) -> dict:
    """Run benchmarks/peers/explain_peers.py MODE in the peers venv; returns its JSON line."""
    python = peers_python()
    if python is None:
        raise FileNotFoundError("peers venv .venv-peers not found: run `make peers`")
    spec_path = Path(folder) / f"peers-{mode}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(python), str(PEERS_SCRIPT), mode, str(spec_path)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"peers {mode} failed: {done.stderr[-1500:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def write_results(name: str, result: dict, table: str) -> None:
    from gradprobe.fileio import atomic_write_text

    atomic_write_text(RESULTS / f"{name}.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{name}.md", table)
    print(table)
    print(f"written: {RESULTS / name}.json and .md")
