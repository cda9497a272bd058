"""What every peer script shares: its spec, the bundle's model rebuilt in torch, and its one JSON result line.

Peer scripts run in the peers venv (``make peers``) through ``benchmarks.harness.peers.run_peer``: the
spec file is their last argument, their result the last JSON line they print. The checkout is put on
``sys.path`` so they time with the same harness (``benchmarks.harness.timing``, numpy only) as the rest.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
if str(CHECKOUT) not in sys.path:
    sys.path.insert(0, str(CHECKOUT))


def read_spec(usage: str, modes: tuple = ()) -> tuple[str | None, dict]:
    """``(mode, spec)`` from ``sys.argv``: ``[MODE] SPEC.json``; exits with ``usage`` when malformed."""
    arguments = sys.argv[1:]
    if len(arguments) != 1 + bool(modes) or (modes and arguments[0] not in modes):
        sys.exit(f"usage: {usage}")
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(arguments[-1]).read_text(encoding="utf-8"))
    return (arguments[0] if modes else None), spec


def print_result(result: dict) -> None:
    """The script's result: one JSON line, the last on stdout."""
    print(json.dumps(result), flush=True)


def load_model(spec: dict):
    """(eval-mode model, target layer module, mean, std) from a peer SPEC (checkpoint, target_layer, normalize)."""
    import torch

    from gradprobe.models import load_checkpoint

    torch.set_num_threads(int(spec.get("threads", 2)))
    model = load_checkpoint(spec["checkpoint"]).eval()
    layer = model.get_submodule(spec["target_layer"])
    normalize = spec.get("normalize")
    if normalize:
        mean = torch.tensor(normalize["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(normalize["std"], dtype=torch.float32).view(1, -1, 1, 1)
    else:
        mean, std = torch.zeros(1), torch.ones(1)
    return model, layer, mean, std

