"""Peer OOD scores from pytorch-ood on the bundle's own model (runs in .venv-peers: needs torchvision).

Usage: ood_peers.py CHECKPOINT SETS.npz FIT.npz OUT.npz
SETS.npz: named image sets float32 [N,1,28,28] in [0,1]; FIT.npz: in-distribution fit images and labels
(for Mahalanobis only, disjoint from every scored set). OUT.npz: "<detector>/<set>" -> scores [N],
pytorch-ood's orientation, which is ours too: higher means more anomalous.
"""
import sys
import time

import numpy as np
import torch
from torch import nn

from gradprobe.models import load_checkpoint
from pytorch_ood.detector import ODIN, EnergyBased, GradNorm, GradUncertainty, Mahalanobis, MaxSoftmax


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def main(checkpoint, sets_path, fit_path, out_path):
    torch.manual_seed(0)
    model = load_checkpoint(checkpoint)
    mean, std = getattr(model, "input_normalization", ((0.0,), (1.0,)))
    net = nn.Sequential(Normalize(mean, std), model).eval()  # takes [0, 1] images like the bundle
    fc = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]

    def forward(x):  # (logits, penultimate features h = the input of the last Linear), one pass
        captured = {}
        hook = dict(net.named_modules())[fc].register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
        try:
            logits = net(x)
        finally:
            hook.remove()
        return logits, captured["h"]

    def encoder(x):
        return forward(x)[1]

    fit = np.load(fit_path)
    with torch.no_grad():
        mahalanobis = Mahalanobis(encoder).fit_features(encoder(torch.from_numpy(fit["images"])),
                                                        torch.from_numpy(fit["labels"]))
    # MSP, Energy and Mahalanobis share one forward pass; the others backpropagate per batch or sample.
    # GradUncertainty on the last Linear only: on all 0.7 M parameters its vmap took ~70 ms per image here.
    shared = {"MSP": lambda logits, h: MaxSoftmax.score(logits),
              "Energy": lambda logits, h: EnergyBased.score(logits),
              "Mahalanobis": lambda logits, h: mahalanobis.predict_features(h)}
    backward = {
        "ODIN": ODIN(net, eps=0.0014, temperature=1000.0),
        "pytorch-ood GradNorm (fc.weight)": GradNorm(net, param_filter=lambda n: n == f"{fc}.weight"),
        "pytorch-ood GradUncertainty (fc)": GradUncertainty(net, param_filter=lambda n: n.startswith(f"{fc}.")),
    }
    sets = np.load(sets_path)
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
    np.savez(out_path, **scores)
    print({k: round(v, 1) for k, v in seconds.items()}, "seconds", file=sys.stderr)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main(*sys.argv[1:5])
