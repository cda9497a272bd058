"""Engine (d) of the latency benchmark: pytorch-grad-cam ``GradCAM`` timed in the peers venv.

Run by ``gradprobe.bench.run_gradcam_peer`` as ``.venv-peers/bin/python gradcam_timing.py SPEC.json``.
SPEC: {"checkpoint": model.safetensors, "target_layer": name, "normalize": {"mean", "std"} | null,
"threads": N, "warmup": N, "budget_s": S, "min_rounds": N, "max_rounds": N,
"batches": [{"batch": B, "images": path.npy, "rounds": R | null}, ...]}. ``rounds`` null: after the warm-up,
about ``budget_s`` seconds of calls, clamped to [min_rounds, max_rounds] (gradprobe.bench's default policy).
Prints one JSON line: {"batches": {"B": [seconds per call, ...]}, "torch": ..., "grad_cam": ...}.

Each timed call is what a user of the library runs for Grad-CAM maps of a batch: normalise the batch,
``cam(input_tensor=x, targets=None)`` (predicted class; forward + one batched backward + upsampled,
min-max-scaled maps). The CAM is used as a context manager so its hooks are released before exit
(its ``__del__`` otherwise runs at interpreter shutdown; see the feasibility notes, Q7).
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from importlib import metadata


def main(spec_path: str) -> int:
    warnings.filterwarnings("ignore")
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)

    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM

    from peer_model import load_model  # beside this script

    model, layer, mean, std = load_model(spec)

    results = {}
    shapes = {}
    with GradCAM(model=model, target_layers=[layer]) as cam:
        for entry in spec["batches"]:
            images = torch.from_numpy(np.ascontiguousarray(np.load(entry["images"]), dtype=np.float32))

            def call():
                return cam(input_tensor=(images - mean) / std, targets=None)

            for _ in range(max(1, int(spec.get("warmup", 1)))):
                start = time.perf_counter()
                maps = call()
                last = time.perf_counter() - start
            rounds = entry.get("rounds")
            if rounds is None:
                wanted = int(float(spec.get("budget_s", 5.0)) / max(last, 1e-6))
                rounds = max(int(spec.get("min_rounds", 10)), min(int(spec.get("max_rounds", 100)), wanted))
            times = []
            for _ in range(int(rounds)):
                start = time.perf_counter()
                maps = call()
                times.append(time.perf_counter() - start)
            results[str(entry["batch"])] = times
            shapes[str(entry["batch"])] = list(maps.shape)

    print(json.dumps({"batches": results, "map_shapes": shapes, "torch": torch.__version__,
                      "grad_cam": metadata.version("grad-cam"), "threads": torch.get_num_threads(),
                      "python": sys.executable}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: gradcam_timing.py SPEC.json")
    sys.exit(main(sys.argv[1]))
