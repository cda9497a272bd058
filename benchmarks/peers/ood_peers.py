"""Peer OOD scores from pytorch-ood on the bundle's own model (runs in the peers venv: needs torchvision).

``ood_peers.py SPEC.json`` through ``benchmarks.harness.peers.run_peer``. SPEC: the model spec (checkpoint,
target_layer, normalize, threads) and "sets": SETS.npz (named image sets float32 [N, 1, H, W] in [0, 1]),
"fit": FIT.npz (in-distribution "images" and "labels", for Mahalanobis only, disjoint from every scored
set), "out": OUT.npz. Writes "<detector>/<set>" -> scores [N] in pytorch-ood's orientation, which is
ours too: higher means more anomalous. Result line: {"out", "detectors", "seconds", "torch", "pytorch-ood"}.
"""
from __future__ import annotations

import time

from peer_common import load_model, print_result, read_spec  # beside this script; puts the checkout on sys.path

from benchmarks.harness.timing import versions


def main(spec: dict) -> dict:
    import numpy as np
    import torch
    from pytorch_ood.detector import ODIN, EnergyBased, GradNorm, GradUncertainty, Mahalanobis, MaxSoftmax
    from torch import nn

    torch.manual_seed(0)
    model, _, mean, std = load_model(spec)

    class Normalize(nn.Module):
        def forward(self, x):
            return (x - mean) / std

    net = nn.Sequential(Normalize(), model).eval()  # takes [0, 1] images like the bundle
    fc = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]

    def forward(x):  # (logits, penultimate features h = the input of the last Linear), one pass
        captured = {}
        hook = net.get_submodule(fc).register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
        try:
            logits = net(x)
        finally:
            hook.remove()
        return logits, captured["h"]

    def encoder(x):
        return forward(x)[1]

    fit = np.load(spec["fit"])
    with torch.no_grad():
        mahalanobis = Mahalanobis(encoder).fit_features(encoder(torch.from_numpy(fit["images"])),
                                                        torch.from_numpy(fit["labels"]))
    # MSP, Energy and Mahalanobis share one forward pass; the others backpropagate per batch or sample.
    # GradUncertainty on the last Linear only: its vmap over every parameter is far too slow on CPU.
    shared = {"MSP": lambda logits, h: MaxSoftmax.score(logits),
              "Energy": lambda logits, h: EnergyBased.score(logits),
              "Mahalanobis": lambda logits, h: mahalanobis.predict_features(h)}
    backward = {
        "ODIN": ODIN(net, eps=0.0014, temperature=1000.0),
        "pytorch-ood GradNorm (fc.weight)": GradNorm(net, param_filter=lambda n: n == f"{fc}.weight"),
        "pytorch-ood GradUncertainty (fc)": GradUncertainty(net, param_filter=lambda n: n.startswith(f"{fc}.")),
    }
    sets = np.load(spec["sets"])
    scores, seconds = {}, {name: 0.0 for name in [*shared, *backward]}
    for set_name in sets.files:
        images = torch.from_numpy(sets[set_name])
        with torch.no_grad():
            outputs = [forward(batch) for batch in torch.split(images, 256)]
        for name, score in shared.items():
            scores[f"{name}/{set_name}"] = torch.cat([score(*o) for o in outputs]).double().numpy()
        for name, detector in backward.items():
            start = time.perf_counter()
            chunks = [detector(batch) for batch in torch.split(images, 128)]
            scores[f"{name}/{set_name}"] = torch.cat(chunks).detach().double().numpy()
            seconds[name] += time.perf_counter() - start
    np.savez(spec["out"], **scores)
    return {"out": spec["out"], "detectors": [*shared, *backward], "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "torch": torch.__version__, **versions("pytorch-ood")}


if __name__ == "__main__":
    print_result(main(read_spec("ood_peers.py SPEC.json")[1]))
