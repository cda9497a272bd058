"""Print (and write to benchmarks/results/parity.md) the parity error table of ONNX Runtime vs autograd.

Same cases as tests/export/test_parity.py. Error = max over elements of
|ours - autograd| / max(|autograd|, 0.1), i.e. relative error with a 1e-5 absolute floor at the 1e-4 bound.
Usage: .venv/bin/python benchmarks/parity_table.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradprobe  # noqa: E402
from gradprobe.export.parity import RELATIVE, parity_errors  # noqa: E402
from gradprobe.export.reference import ResearchReference  # noqa: E402
from gradprobe.fileio import atomic_write_text  # noqa: E402
from tests.conftest import REFERENCE_MODELS, make_model  # noqa: E402
from tests.export.test_parity import _contrast, _inputs  # noqa: E402

FLOAT_OUTPUTS = ["logits", "probs", "features", "label_grad_sqnorm", "confounding_grad_sqnorm", "cam",
                 "contrastive_cam", "counterfactual_cam"]


def main() -> int:
    fmnist = gradprobe.data.fashion_mnist("test")
    lines = ["| model | batch | inputs | " + " | ".join(FLOAT_OUTPUTS) + " | pred, Q mismatches |",
             "|---|---|---|" + "---|" * (len(FLOAT_OUTPUTS) + 1)]
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in REFERENCE_MODELS:
            model = make_model(name)
            probe = gradprobe.load(gradprobe.export(model, fmnist[0][:4], Path(folder) / name))
            manifest = probe.manifest
            reference = ResearchReference.for_bundle(model, manifest)
            for batch in (1, 5, 64):
                for kind in ("random", "real"):
                    images, contrast = _inputs(kind, batch, fmnist), _contrast(batch, len(probe.class_names))
                    errors = parity_errors(vars(probe.run(images, contrast)), reference.run(images, contrast))
                    worst = max(worst, *(errors[k] for k in FLOAT_OUTPUTS))
                    mismatches = int(round((errors["pred"] + errors["contrast_class"]) * batch))
                    lines.append(f"| {name} | {batch} | {kind} | "
                                 + " | ".join(f"{errors[k]:.1e}" for k in FLOAT_OUTPUTS) + f" | {mismatches} |")
    lines.append(f"\nWorst error {worst:.1e} (bound {RELATIVE:.0e}): {'PASS' if worst <= RELATIVE else 'FAIL'}")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(Path(__file__).parent / "results" / "parity.md", "# Parity: ONNX Runtime vs autograd\n\n"
                      + table + "\n")
    return 0 if worst <= RELATIVE else 1


if __name__ == "__main__":
    sys.exit(main())
