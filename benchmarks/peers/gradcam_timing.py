"""Engine (d) of the latency benchmark: pytorch-grad-cam ``GradCAM`` timed in the peers venv.

Run by ``benchmarks.latency`` through the peers runner: ``gradcam_timing.py SPEC.json``.
SPEC: the model spec (checkpoint, target_layer, normalize, threads), ``"policy"`` (a
``benchmarks.harness.timing.RoundsPolicy`` as a dict) and ``"batches": [{"batch": B, "images": path.npy,
"rounds": R | null}]`` (null: the policy chooses). Result: {"batches": {"B": [seconds per call, ...]},
"map_shapes", "torch", "grad_cam", "threads"}.

Each timed call is what a user of the library runs for Grad-CAM maps of a batch: normalise the batch,
``cam(input_tensor=x, targets=None)`` (predicted class; forward, one batched backward, upsampled and
min-max-scaled maps). The CAM is a context manager so its hooks are released before exit (its
``__del__`` at interpreter shutdown can fail, see the feasibility notes, Q7).
"""
from __future__ import annotations

from peer_common import load_model, print_result, read_spec  # beside this script; puts the checkout on sys.path

from benchmarks.harness.timing import RoundsPolicy, time_interleaved, versions


def main(spec: dict) -> dict:
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM

    model, layer, mean, std = load_model(spec)
    policy = {"d": RoundsPolicy(**spec["policy"])}
    results, shapes = {}, {}
    with GradCAM(model=model, target_layers=[layer]) as cam:
        def call(images):
            return cam(input_tensor=(images - mean) / std, targets=None)

        for entry in spec["batches"]:
            images = torch.from_numpy(np.ascontiguousarray(np.load(entry["images"]), dtype=np.float32))
            rounds = {"d": entry["rounds"]} if entry.get("rounds") else None
            results[str(entry["batch"])] = time_interleaved({"d": call}, images, policy, rounds)["d"]
            shapes[str(entry["batch"])] = list(call(images).shape)
    return {"batches": results, "map_shapes": shapes, "torch": torch.__version__,
            "grad_cam": versions("grad-cam")["grad-cam"], "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print_result(main(read_spec("gradcam_timing.py SPEC.json")[1]))
