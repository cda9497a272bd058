"""The peers' explanation maps and timings, run in the peers venv (torchvision + grad-cam + captum).

``.venv-peers/bin/python benchmarks/peers/explain_peers.py maps|time SPEC.json``; prints one JSON line.

SPEC: {"checkpoint": model.safetensors, "target_layer": name, "normalize": {"mean", "std"} | null, "threads": N,
- maps: "images": path.npy, "contrast": path.npy [N] int64 (Q), "out": folder} -> writes gradcam_{cam,
  contrastive_cam,counterfactual_cam}.npy and captum_cam.npy, each [N, H, W] upsampled and min-max normalised.
- time: "batches": [{"batch": B, "images": path.npy}], "warmup": N, "rounds": N} -> seconds per call of each
  engine, timed round-robin (so drifts of a shared machine hit all alike).

How each peer expresses METHODS.md §3 (one backward per map kind, targets as data):
- pytorch-grad-cam ``GradCAM``: Grad-CAM ``targets=None`` (predicted class, logit); contrastive a target callable
  ``-log_softmax(z)[Q]`` = CE(z, Q); counterfactual a target ``-z[P]`` (negated gradient = negated weights).
- Captum ``LayerGradCam``: the same three scalars through forward-function wrappers (logits, -log_softmax,
  -logits) and ``target=``; the layer-resolution maps are upsampled with ``LayerAttribution.interpolate``
  (bilinear) and min-max normalised, so every engine returns the same [B, H, W] maps.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

from peer_model import load_model  # beside this script


class Engines:
    """Callables images -> maps for each peer and map kind (P and Q from a forward pass, as a user would)."""

    def __init__(self, model, layer):
        import torch
        from captum.attr import LayerGradCam
        from pytorch_grad_cam import GradCAM

        self.torch, self.model = torch, model
        self.gradcam = GradCAM(model=model, target_layers=[layer])
        self.captum = {kind: LayerGradCam(forward, layer) for kind, forward in (
            ("cam", model), ("contrastive_cam", lambda x: -torch.log_softmax(model(x), dim=1)),
            ("counterfactual_cam", lambda x: -model(x)))}

    def classes(self, x, contrast=None):
        """P (argmax) and Q (given, or the runner-up) from one forward without gradients."""
        with self.torch.no_grad():
            top2 = self.model(x).topk(2, dim=1).indices
        return top2[:, 0], (top2[:, 1] if contrast is None else self.torch.as_tensor(contrast))

    def gradcam_maps(self, x, kinds, contrast=None):
        if kinds == ("cam",):
            return {"cam": self.gradcam(input_tensor=x, targets=None)}
        p, q = self.classes(x, contrast)
        out = {}
        for kind in kinds:
            if kind == "cam":
                targets = None  # the library's default: ClassifierOutputTarget(argmax), i.e. z[P]
            elif kind == "contrastive_cam":
                targets = [lambda z, c=int(c): -self.torch.log_softmax(z, dim=-1)[c] for c in q]
            else:
                targets = [lambda z, c=int(c): -z[c] for c in p]
            out[kind] = self.gradcam(input_tensor=x, targets=targets)
        return out

    def captum_maps(self, x, kinds, contrast=None):
        from captum.attr import LayerAttribution

        p, q = self.classes(x, contrast)
        out = {}
        for kind in kinds:
            raw = self.captum[kind].attribute(x, target=q if kind == "contrastive_cam" else p, relu_attributions=True)
            maps = LayerAttribution.interpolate(raw, tuple(x.shape[2:]), "bilinear")[:, 0].detach()
            flat = maps.reshape(len(maps), -1)
            low = flat.min(dim=1, keepdim=True).values
            flat = flat - low
            out[kind] = (flat / (flat.max(dim=1, keepdim=True).values + 1e-7)).reshape(maps.shape).numpy()
        return out

    def close(self):
        self.gradcam.__exit__(None, None, None)  # release its hooks before interpreter shutdown


ALL = ("cam", "contrastive_cam", "counterfactual_cam")


def maps(spec) -> dict:
    import numpy as np
    import torch

    model, layer, mean, std = load_model(spec)
    images = torch.from_numpy(np.load(spec["images"]).astype(np.float32))
    contrast = np.load(spec["contrast"]) if spec.get("contrast") else None
    engines = Engines(model, layer)
    chunks = {}
    for start in range(0, len(images), 64):
        x = (images[start:start + 64] - mean) / std
        q = None if contrast is None else contrast[start:start + 64]
        for prefix, result in (("gradcam", engines.gradcam_maps(x, ALL, q)), ("captum", engines.captum_maps(x, ALL, q))):
            for kind, value in result.items():
                chunks.setdefault(f"{prefix}_{kind}", []).append(np.asarray(value, dtype=np.float32))
    engines.close()
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for name, parts in chunks.items():
        np.save(out / f"{name}.npy", np.concatenate(parts))
    return {"written": sorted(chunks)}


def timing(spec) -> dict:
    import numpy as np
    import torch

    model, layer, mean, std = load_model(spec)
    engines = Engines(model, layer)
    calls = {"gradcam.cam": lambda x: engines.gradcam_maps(x, ("cam",)),
             "gradcam.all3": lambda x: engines.gradcam_maps(x, ALL),
             "captum.cam": lambda x: engines.captum_maps(x, ("cam",)),
             "captum.all3": lambda x: engines.captum_maps(x, ALL)}
    results = {}
    for entry in spec["batches"]:
        images = torch.from_numpy(np.ascontiguousarray(np.load(entry["images"]), dtype=np.float32))
        times = {name: [] for name in calls}
        for round_ in range(int(spec.get("warmup", 2)) + int(entry.get("rounds", spec.get("rounds", 10)))):
            for name, call in calls.items():
                start = time.perf_counter()
                call((images - mean) / std)  # normalising is part of what a user runs
                if round_ >= int(spec.get("warmup", 2)):
                    times[name].append(time.perf_counter() - start)
        results[str(entry["batch"])] = times
    engines.close()
    return {"batches": results, "torch": torch.__version__, "grad_cam": metadata.version("grad-cam"),
            "captum": metadata.version("captum"), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("maps", "time"):
        sys.exit("usage: explain_peers.py maps|time SPEC.json")
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(sys.argv[2]).read_text())
    print(json.dumps(maps(spec) if sys.argv[1] == "maps" else timing(spec)))
