"""Pictures of explanations: maps upsampled to the image, normalised, overlaid in a PNG grid."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base.errors import BackendUnavailableError
from .base.fileio import atomic_path


def _interpolation_matrix(source: int, target: int) -> np.ndarray:
    """[target, source] weights of bilinear resampling with half-pixel centres (align_corners=False)."""
    position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    weight = position - low
    matrix = np.zeros((target, source))
    matrix[np.arange(target), low] += 1 - weight
    matrix[np.arange(target), high] += weight
    return matrix


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize [B, u, v] maps to [B, H, W] (the convention of cv2.resize and F.interpolate)."""
    rows = _interpolation_matrix(maps.shape[1], size[0])
    cols = _interpolation_matrix(maps.shape[2], size[1])
    return np.einsum("hu,buv,wv->bhw", rows, maps.astype(np.float64), cols).astype(np.float32)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Min-max normalise each map to [0, 1]; a constant map becomes all zeros. Scale-free (no epsilon added to
    the range): a map's look does not depend on the size of its logits (pytorch-grad-cam's ``+ 1e-7`` shows
    on maps whose range is near 1e-4, as a random-init AlexNet's Grad-CAM has)."""
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    shifted = flat - flat.min(axis=1, keepdims=True)
    span = shifted.max(axis=1, keepdims=True)
    normalised = np.divide(shifted, span, out=np.zeros_like(shifted), where=span > 0)
    return normalised.reshape(maps.shape).astype(np.float32)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise BackendUnavailableError("pictures need matplotlib: pip install 'gradprobe[viz]'") from error
    return plt


def _probability(value: float) -> str:
    """0.97, or 3e-04 for small ones: a contrast class's probability is often far below 0.01."""
    return f"{value:.2f}" if value >= 0.01 else f"{value:.0e}"


def explanation_figure(images: np.ndarray, explanation, path: str | os.PathLike, *, row_names=None,
                       labels=None, title: str | None = None, alpha: float = 0.5) -> Path:
    """Write a PNG for an ``Explanation``: one row per image - the input, then every map of the bundle (one
    panel per contrast class Q for the maps that use Q) as jet overlays, captioned with the map's question,
    class names and probabilities.

    ``row_names`` (optional) heads each row, e.g. the file name; ``labels`` marks wrong predictions in red.
    """
    plt = _pyplot()
    names, probs = explanation.class_names, explanation.probs
    panels_per_row = [(spec, q, maps, k) for spec in explanation.specs
                      for k, (q, maps) in enumerate(explanation.columns(spec.name))]
    count, columns = len(images), 1 + len(panels_per_row)
    figure, axes = plt.subplots(count, columns, figsize=(2.1 * columns, 2.35 * count + (0.5 if title else 0)),
                                squeeze=False)
    for row in range(count):
        p = int(explanation.pred[row])
        pred = f"{names[p]} ({_probability(probs[row, p])})"
        heading = (f"{row_names[row]}\n" if row_names is not None else "") + f"P = {pred}"
        wrong = labels is not None and labels[row] != p
        if labels is not None:
            heading += f"\ntrue: {names[labels[row]]}"
        panels = [(None, False, heading)]
        for spec, q, maps, k in panels_per_row:
            empty = np.asarray(explanation.empty.get(spec.name, np.zeros(count, bool)))[row]
            contrast = "" if q is None else f"{names[q[row]]} ({_probability(probs[row, q[row]])})"
            panels.append((maps[row], bool(np.atleast_1d(empty)[k if q is not None else 0]),
                           spec.question.format(P=pred if q is None else names[p], Q=contrast)))
        for column, (overlay, is_empty, text) in enumerate(panels):
            axis = axes[row, column]
            axis.imshow(images[row].mean(axis=0), cmap="gray", vmin=0, vmax=1)
            if overlay is not None:
                axis.imshow(overlay, cmap="jet", alpha=alpha, vmin=0, vmax=1)
                text += "\n(empty: no evidence)" if is_empty else ""
            axis.set_title(text, fontsize=8, color="crimson" if wrong and overlay is None else "black")
            axis.set_xticks([])
            axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / figure.get_figheight()) if title else None)
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(figure)
    return path
