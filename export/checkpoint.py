"""Checkpoints as safetensors (never pickle): weights plus the model config and metadata as JSON strings."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from gradprobe.base.errors import BundleError
from gradprobe.base.fileio import atomic_write_bytes

from .models import build_model

PRETRAINED = {"resnet-fmnist": "resnet-fmnist.safetensors"}  # files under gradprobe/pretrained/


def checkpoint_bytes(model: torch.nn.Module, **metadata) -> bytes:
    """``model``'s state dict and config as safetensors bytes; ``metadata`` values are stored as JSON."""
    header = {"config": json.dumps(model.config)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    tensors = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    return save(tensors, metadata=header)


def save_checkpoint(model: torch.nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Write ``model``'s checkpoint atomically (see ``checkpoint_bytes``)."""
    return atomic_write_bytes(path, checkpoint_bytes(model, **metadata))


def _header(data: bytes) -> dict:
    """The safetensors header (8-byte little-endian length, then JSON) of checkpoint bytes."""
    if len(data) < 8:
        raise BundleError("checkpoint is truncated: no safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > min(len(data) - 8, 100 << 20):
        raise BundleError("checkpoint header is damaged: it claims more bytes than the file holds")
    try:
        header = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"checkpoint header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise BundleError("checkpoint header is not a safetensors header")
    return header


def read_metadata(source: str | os.PathLike | bytes) -> dict:
    """The JSON metadata stored beside the weights (``config``, ``normalize``, ``class_names`` ...)."""
    if not isinstance(source, bytes):
        try:
            source = Path(source).read_bytes()
        except OSError as error:
            raise BundleError(f"cannot read checkpoint {source}: {error}") from error
    raw = _header(source).get("__metadata__") or {}
    try:
        return {key: json.loads(value) for key, value in raw.items()}
    except (TypeError, json.JSONDecodeError) as error:
        raise BundleError(f"checkpoint metadata is not JSON: {error}") from error


def load_checkpoint(source: str | os.PathLike | bytes) -> torch.nn.Module:
    """Rebuild the model from a checkpoint (a path, or its bytes as ``Bundle.read`` returns them) in eval mode."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    metadata = read_metadata(data)
    if "config" not in metadata:
        raise BundleError(f"{'checkpoint' if isinstance(source, bytes) else source} holds no model config: "
                          "it was not written by gradprobe")
    model = build_model(metadata["config"])
    try:
        model.load_state_dict(load(data))
    except (SafetensorError, RuntimeError) as error:
        raise BundleError(f"checkpoint weights do not fit the model they describe: {str(error)[:300]}") from error
    if "normalize" in metadata:
        model.input_normalization = tuple(tuple(v) for v in metadata["normalize"])
    if "class_names" in metadata:
        model.class_names = list(metadata["class_names"])
    return model.eval()


def load_pretrained(name: str = "resnet-fmnist") -> torch.nn.Module:
    """A checkpoint shipped with the package, as an eval-mode model (see README for how it was made)."""
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; expected one of {sorted(PRETRAINED)}")
    path = Path(str(resources.files("gradprobe") / "pretrained" / PRETRAINED[name]))
    if not path.exists():
        raise BundleError(f"pretrained checkpoint {path} is missing from the installation; reinstall gradprobe")
    return load_checkpoint(path)
