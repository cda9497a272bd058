"""The peers' explanation maps and timings, run in the peers venv (torchvision + grad-cam, Captum if installed).

``explain_peers.py maps|time SPEC.json`` through ``benchmarks.harness.peers.run_peer``; prints one JSON line.

SPEC: the model spec (checkpoint, target_layer, normalize, threads) and
- maps: "images": path.npy, "contrast": path.npy [N] int64 (Q), "out": folder -> writes
  gradcam_{cam,contrastive_cam,counterfactual_cam,gradcam_pp}.npy and captum_{cam,contrastive_cam,
  counterfactual_cam}.npy, each [N, H, W] upsampled and min-max normalised;
- time: "batches": [{"batch": B, "images": path.npy, "rounds": R}], "policy": a RoundsPolicy dict -> seconds
  per call of each engine, interleaved by ``benchmarks.harness.timing`` (drifts hit all engines alike).
Captum missing from the venv: its engines are left out and ``"skipped"`` says so.

How each peer expresses the maps (one backward per map, targets as data):
- pytorch-grad-cam ``GradCAM``: Grad-CAM ``targets=None`` (predicted class, logit); contrastive a target
  callable ``-log_softmax(z)[Q]`` = CE(z, Q); counterfactual a target ``-z[P]`` (negated gradient = negated
  weights). ``GradCAMPlusPlus`` with ``targets=None`` for Grad-CAM++.
- Captum ``LayerGradCam`` (no Grad-CAM++): the same three scalars through forward-function wrappers (logits,
  -log_softmax, -logits) and ``target=``; the layer-resolution maps are upsampled with
  ``LayerAttribution.interpolate`` (bilinear) and min-max normalised, like every other engine's.
"""
from __future__ import annotations

from peer_common import load_model, print_result, read_spec  # beside this script; puts the checkout on sys.path

from benchmarks.harness.timing import RoundsPolicy, time_interleaved, versions

GRADCAM_MAPS = ("cam", "contrastive_cam", "counterfactual_cam", "gradcam_pp")
CAPTUM_MAPS = ("cam", "contrastive_cam", "counterfactual_cam")
THREE = CAPTUM_MAPS


class Engines:
    """Callables images -> maps for each peer and map (P and Q from a forward pass, as a user would)."""

    def __init__(self, model, layer):
        import torch
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

        self.torch, self.model = torch, model
        self.gradcam = GradCAM(model=model, target_layers=[layer])
        self.gradcam_pp = GradCAMPlusPlus(model=model, target_layers=[layer])
        try:
            from captum.attr import LayerGradCam
        except ImportError:
            self.captum, self.skipped = None, {"captum": "captum is not installed in the peers venv (make peers)"}
        else:
            self.skipped = {}
            self.captum = {kind: LayerGradCam(forward, layer) for kind, forward in (
                ("cam", model), ("contrastive_cam", lambda x: -torch.log_softmax(model(x), dim=1)),
                ("counterfactual_cam", lambda x: -model(x)))}

    def classes(self, x, contrast=None):
        """P (argmax) and Q (given, or the runner-up) from one forward without gradients."""
        with self.torch.no_grad():
            top2 = self.model(x).topk(2, dim=1).indices
        return top2[:, 0], (top2[:, 1] if contrast is None else self.torch.as_tensor(contrast))

    def gradcam_maps(self, x, kinds, contrast=None):
        if all(kind in ("cam", "gradcam_pp") for kind in kinds):  # no P or Q needed: no extra forward
            return {kind: (self.gradcam if kind == "cam" else self.gradcam_pp)(input_tensor=x, targets=None)
                    for kind in kinds}
        p, q = self.classes(x, contrast)
        out = {}
        for kind in kinds:
            cam, targets = self.gradcam, None  # None: the library's ClassifierOutputTarget(argmax), i.e. z[P]
            if kind == "gradcam_pp":
                cam = self.gradcam_pp
            elif kind == "contrastive_cam":
                targets = [lambda z, c=int(c): -self.torch.log_softmax(z, dim=-1)[c] for c in q]
            elif kind == "counterfactual_cam":
                targets = [lambda z, c=int(c): -z[c] for c in p]
            out[kind] = cam(input_tensor=x, targets=targets)
        return out

    def captum_maps(self, x, kinds, contrast=None):
        from captum.attr import LayerAttribution

        p, q = self.classes(x, contrast)
        out = {}
        for kind in kinds:
            raw = self.captum[kind].attribute(x, target=q if kind == "contrastive_cam" else p, relu_attributions=True)
            maps = LayerAttribution.interpolate(raw, tuple(x.shape[2:]), "bilinear")[:, 0].detach()
            flat = maps.reshape(len(maps), -1)
            flat = flat - flat.min(dim=1, keepdim=True).values
            out[kind] = (flat / (flat.max(dim=1, keepdim=True).values + 1e-7)).reshape(maps.shape).numpy()
        return out

    def close(self):
        for cam in (self.gradcam, self.gradcam_pp):
            cam.__exit__(None, None, None)  # release the hooks before interpreter shutdown


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
        results = [("gradcam", engines.gradcam_maps(x, GRADCAM_MAPS, q))]
        if engines.captum is not None:
            results.append(("captum", engines.captum_maps(x, CAPTUM_MAPS, q)))
        for prefix, result in results:
            for kind, value in result.items():
                chunks.setdefault(f"{prefix}_{kind}", []).append(np.asarray(value, dtype=np.float32))
    engines.close()
    from pathlib import Path

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for name, parts in chunks.items():
        np.save(out / f"{name}.npy", np.concatenate(parts))
    return {"written": sorted(chunks), "skipped": engines.skipped}


def timing(spec) -> dict:
    import numpy as np
    import torch

    model, layer, mean, std = load_model(spec)
    engines = Engines(model, layer)
    calls = {"gradcam.cam": lambda x: engines.gradcam_maps(x, ("cam",)),
             "gradcam.pp": lambda x: engines.gradcam_maps(x, ("gradcam_pp",)),
             "gradcam.all3": lambda x: engines.gradcam_maps(x, THREE)}
    if engines.captum is not None:
        calls.update({"captum.cam": lambda x: engines.captum_maps(x, ("cam",)),
                      "captum.all3": lambda x: engines.captum_maps(x, THREE)})
    policy = RoundsPolicy(**spec["policy"])
    results = {}
    for entry in spec["batches"]:
        images = torch.from_numpy(np.ascontiguousarray(np.load(entry["images"]), dtype=np.float32))
        # normalising is part of what a user runs
        timed = {name: (lambda x, call=call: call((x - mean) / std)) for name, call in calls.items()}
        results[str(entry["batch"])] = time_interleaved(timed, images, {name: policy for name in timed},
                                                        {name: entry["rounds"] for name in timed})
    engines.close()
    return {"batches": results, "torch": torch.__version__, **versions("grad-cam", "captum"),
            "threads": torch.get_num_threads(), "skipped": engines.skipped}


if __name__ == "__main__":
    mode, spec = read_spec("explain_peers.py maps|time SPEC.json", modes=("maps", "time"))
    print_result(maps(spec) if mode == "maps" else timing(spec))
