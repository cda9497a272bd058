"""Pictures of explanations: maps upsampled to the image, normalised, overlaid in a PNG grid."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError
from .fileio import atomic_path


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
    """Min-max normalise each map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1, keepdims=True)
    shifted = flat - low
    return (shifted / (shifted.max(axis=1, keepdims=True) + 1e-7)).reshape(maps.shape).astype(np.float32)


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
    """Write a PNG for an ``Explanation``: one row per image - input, Grad-CAM, one contrastive map per Q,
    counterfactual - as jet overlays, with class names and probabilities in the titles.

    ``row_names`` (optional) heads each row, e.g. the file name; ``labels`` marks wrong predictions in red.
    """
    plt = _pyplot()
    names, probs = explanation.class_names, explanation.probs
    columns = explanation.contrast_columns()
    count = len(images)
    figure, axes = plt.subplots(count, 3 + len(columns), figsize=(2.1 * (3 + len(columns)),
                                2.35 * count + (0.5 if title else 0)), squeeze=False)
    for row in range(count):
        p = int(explanation.pred[row])
        pred = f"{names[p]} ({_probability(probs[row, p])})"
        heading = (f"{row_names[row]}\n" if row_names is not None else "") + f"P = {pred}"
        wrong = labels is not None and labels[row] != p
        if labels is not None:
            heading += f"\ntrue: {names[labels[row]]}"
        empty = {kind: np.asarray(mask)[row] for kind, mask in explanation.empty.items()}
        contrastive_empty = np.atleast_1d(empty.get("contrastive_cam", np.zeros(len(columns), bool)))
        panels = [(None, False, heading), (explanation.cam[row], empty.get("cam", False), f"why {pred}?")]
        for k, (q, maps) in enumerate(columns):
            panels.append((maps[row], contrastive_empty[k],
                           f"why {names[p]},\nrather than {names[q[row]]} ({_probability(probs[row, q[row]])})?"))
        panels.append((explanation.counterfactual_cam[row], empty.get("counterfactual_cam", False),
                       f"what if not {names[p]}?"))
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
