"""Checkpoints as safetensors (never pickle): weights plus the model config and metadata as JSON strings."""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

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


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata stored beside the weights (``config``, ``normalize``, ``class_names`` ...)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise BundleError(f"cannot read checkpoint {path}: {error}") from error
    return {key: json.loads(value) for key, value in raw.items()}


def load_checkpoint(path: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model from its stored config, load the weights, return it in eval mode."""
    metadata = read_metadata(path)
    if "config" not in metadata:
        raise BundleError(f"{path} holds no model config: it was not written by gradprobe")
    model = build_model(metadata["config"])
    model.load_state_dict(load_file(str(path)))
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
