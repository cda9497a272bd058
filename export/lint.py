"""A probe graph checked with NVIDIA's own ONNX tools before any TensorRT build: no torch, no GPU needed.

Three checks, each what a TensorRT deployment would trip over first:
1. ``polygraphy check lint``: the ONNX checker on the whole model, then every node run on its own
   through ONNX Runtime with generated inputs (a node that cannot run is named in the report);
2. ``polygraphy surgeon sanitize --fold-constants``: ONNX-GraphSurgeon folds what is constant and
   removes dead nodes; the sanitised graph must still give the same outputs (run through ONNX Runtime);
3. the TensorRT ONNX-parser operator check (``tensorrt_ops``) on the sanitised graph, the one a
   builder would parse.

The tools run in-process through Polygraphy's own command-line entry (``polygraphy.tools.main``), so
what is checked is exactly what ``polygraphy check lint`` and ``polygraphy surgeon sanitize`` do.
They come with the ``[lint]`` extra (polygraphy, onnx-graphsurgeon).
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradprobe.base.errors import BackendUnavailableError

from .tensorrt_ops import tensorrt_incompatibilities


@dataclass
class LintReport:
    """What the checks found; ``problems`` is empty when the graph passes all three."""

    nodes: int
    folded_nodes: int
    lint: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _polygraphy(arguments: list[str]) -> int:
    try:
        from polygraphy.tools import main
        import onnx_graphsurgeon  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError("the graph lint needs NVIDIA's polygraphy and onnx-graphsurgeon: "
                                      "pip install 'gradprobe[lint]'") from error
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = main(arguments + ["--silent"])
    return int(code or 0)


def _random_feeds(model, batch: int, seed: int = 0) -> dict:
    from onnx import TensorProto

    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        kind = value.type.tensor_type.elem_type
        shape = [d.dim_value if d.dim_value > 0 else batch for d in value.type.tensor_type.shape.dim]
        if kind == TensorProto.FLOAT:
            feeds[value.name] = rng.random(shape, dtype=np.float32)
        elif kind == TensorProto.INT64:  # class indices (the contrast class); -1 means "runner-up"
            feeds[value.name] = np.full(shape, -1, np.int64)
        else:
            raise ValueError(f"input {value.name!r} has ONNX element type {kind}, which the lint cannot feed")
    return feeds


def lint_graph(model_bytes: bytes, *, batch: int = 2, workdir: str | Path | None = None) -> LintReport:
    """Run the three checks on a serialized probe graph; see the module docstring."""
    import onnx
    from gradprobe.runtime import create_backend

    with contextlib.ExitStack() as stack:
        folder = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        source, sanitized, report_path = folder / "probe.onnx", folder / "probe.sanitized.onnx", folder / "lint.json"
        source.write_bytes(model_bytes)
        model = onnx.load_from_string(model_bytes)
        problems = []

        code = _polygraphy(["check", "lint", str(source), "-o", str(report_path)])
        lint = json.loads(report_path.read_text()) if report_path.is_file() else {}
        failing = lint.get("summary", {}).get("failing", [])
        errors = [entry for entry in lint.get("lint_entries", []) if entry.get("level") != "warning"]
        if code or failing or errors:
            problems.append(f"polygraphy check lint: exit {code}, failing nodes {failing[:10]}, "
                            f"errors {[e.get('message', '')[:200] for e in errors[:5]]}")

        code = _polygraphy(["surgeon", "sanitize", str(source), "--fold-constants", "-o", str(sanitized)])
        if code or not sanitized.is_file():
            problems.append(f"polygraphy surgeon sanitize --fold-constants: exit {code}")
            return LintReport(len(model.graph.node), 0, lint, problems)
        folded = onnx.load(str(sanitized))
        if [o.name for o in folded.graph.output] != [o.name for o in model.graph.output]:
            problems.append("sanitize changed the graph's outputs")
        problems += [f"TensorRT parser: {p}" for p in tensorrt_incompatibilities(folded)]

        feeds = _random_feeds(model, batch)
        try:
            before = create_backend("onnxruntime", model_bytes, threads=1).infer(feeds)
            after = create_backend("onnxruntime", sanitized.read_bytes(), threads=1).infer(feeds)
        except Exception as error:  # ORT's own exception types; what matters is that the graph does not run
            problems.append(f"ONNX Runtime cannot run the graph on batch {batch}: {str(error)[:300]}")
            return LintReport(len(model.graph.node), len(folded.graph.node), lint, problems)
        for output in model.graph.output:
            a, b = before[output.name], after[output.name]
            scale = max(float(np.abs(a).max(initial=0.0)), 1e-6)
            if a.shape != b.shape or float(np.abs(a.astype(np.float64) - b).max(initial=0.0)) > 1e-4 * scale:
                problems.append(f"sanitized graph differs from the original in {output.name!r}")
        return LintReport(len(model.graph.node), len(folded.graph.node), lint, problems)
