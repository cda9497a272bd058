"""The parity error table of ONNX Runtime vs autograd, written to benchmarks/results/parity.md.

Same cases as tests/export/test_parity.py (its reference models and inputs). Error = max over elements of
|ours - autograd| / max(|autograd|, 0.1) (``gradprobe.export.parity``), i.e. relative error with a 1e-5
absolute floor at the 1e-4 bound; every float output of the bundle is a column, every map included.

    python -m benchmarks.cli eval parity          (or: gradprobe eval parity)
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .harness import timing


def _reference_models():
    """The parity suite's models and inputs, from the test tree of this checkout."""
    try:
        from tests.reference_models import REFERENCE_MODELS, make_model
    except ImportError:  # the test tree before its split by source
        from tests.conftest import REFERENCE_MODELS, make_model
    from tests.export.test_parity import _contrast, _inputs

    return REFERENCE_MODELS, make_model, _inputs, _contrast


def measure() -> tuple[str, bool]:
    import gradprobe
    from gradprobe.export.parity import RELATIVE, parity_errors
    from gradprobe.export.reference import ResearchReference

    models, make_model, inputs, contrast_for = _reference_models()
    fmnist = gradprobe.data.fashion_mnist("test")
    lines, columns, worst = [], None, 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in models:
            model = make_model(name)
            probe = gradprobe.load(gradprobe.export(model, fmnist[0][:4], Path(folder) / name))
            reference = ResearchReference.for_bundle(model, probe.manifest)
            for batch in (1, 5, 64):
                for kind in ("random", "real"):
                    images, contrast = inputs(kind, batch, fmnist), contrast_for(batch, len(probe.class_names))
                    expected = reference.run(images, contrast)
                    errors = parity_errors(probe.run(images, contrast).as_dict(), expected)
                    if columns is None:
                        columns = [k for k, v in expected.items() if v.dtype.kind == "f"]
                    worst = max(worst, *(errors[k] for k in columns))
                    mismatches = int(round((errors["pred"] + errors["contrast_class"]) * batch))
                    lines.append(f"| {name} | {batch} | {kind} | " + " | ".join(f"{errors[k]:.1e}" for k in columns)
                                 + f" | {mismatches} |")
    head = ["| model | batch | inputs | " + " | ".join(columns) + " | pred, Q mismatches |",
            "|---|---|---|" + "---|" * (len(columns) + 1)]
    verdict = f"\nWorst error {worst:.1e} (bound {RELATIVE:.0e}): {'PASS' if worst <= RELATIVE else 'FAIL'}"
    return "\n".join(head + lines) + verdict, worst <= RELATIVE


def add_arguments(parser) -> None:
    timing.add_output_arguments(parser)


def run(args) -> int:
    markdown, passed = measure()
    timing.publish("parity", "# Parity: ONNX Runtime vs autograd\n\n" + markdown + "\n", None, args.out)
    return 0 if passed else 1


EVALUATIONS = {"parity": ("parity table: every probe output vs per-sample autograd, the parity suite's models",
                          add_arguments, run)}
