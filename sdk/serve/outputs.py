"""The one adapter between probe results and named arrays, shared by the Triton server and Ray scoring.

Every place in ``gradprobe.serve`` that needs an output's name, dtype or shape goes through
``probe_outputs``; dtypes and per-image shapes are read off the arrays it returns (``output_specs``).
The names come from the bundle itself (``ProbeResult.as_dict()``, ``Explanation.maps``), so a new graph
output or a new map in the maps table is served and written without a change here.
"""
from __future__ import annotations

import numpy as np

#: An explanation map at the input size (``Probe.explain``, normalised) is output ``<raw map name>_map``.
MAP_SUFFIX = "_map"
#: The calibrated detector's outputs (``Probe.detect``): higher score = more anomalous.
DETECTOR_OUTPUTS = ("detector_score", "is_anomalous")


def probe_outputs(result, detection=None, explanation=None) -> dict[str, np.ndarray]:
    """``{name: array [B, ...]}``: every output of ``result`` (a ``ProbeResult``), then the detector's
    score and decision when ``detection`` is given, then the normalised maps (``cam_map``, ...) when
    ``explanation`` is."""
    arrays = result.as_dict()
    if detection is not None:
        arrays["detector_score"] = np.asarray(detection.score)
        arrays["is_anomalous"] = np.asarray(detection.is_anomalous, dtype=bool)
    if explanation is not None:
        arrays.update({f"{name}{MAP_SUFFIX}": maps for name, maps in explanation.maps.items()})
    return arrays


def is_map(name: str) -> bool:
    """Whether output ``name`` is a normalised explanation map (computed only when asked for)."""
    return name.endswith(MAP_SUFFIX)


def detect_or_none(probe, images):
    """``probe.detect(images)``, or None when the bundle has no calibrated detector."""
    from gradprobe import NotFittedError

    try:
        return probe.detect(images)
    except NotFittedError:
        return None


def output_specs(probe, *, maps: bool = False) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{name: (dtype, per-image shape)}`` of everything ``probe_outputs`` gives for this bundle,
    found by running one blank image (so the specs are what the engine really returns)."""
    blank = np.zeros((1, *probe.input_shape), dtype=np.float32)
    detection = detect_or_none(probe, blank)
    result = detection.probe if detection is not None else probe.run(blank)
    arrays = probe_outputs(result, detection, probe.explain(blank) if maps else None)
    return {name: (array.dtype, tuple(array.shape[1:])) for name, array in arrays.items()}
