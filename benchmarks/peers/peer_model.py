"""What every peer script needs first: the bundle's model, its target layer and its input normalisation."""
from __future__ import annotations


def load_model(spec: dict):
    """(eval-mode model, target layer module, mean, std) from a peer SPEC (checkpoint, target_layer, ...)."""
    import torch

    from gradprobe.models import load_checkpoint

    torch.set_num_threads(int(spec.get("threads", 2)))
    model = load_checkpoint(spec["checkpoint"]).eval()
    layer = model.get_submodule(spec["target_layer"])
    normalize = spec.get("normalize")
    if normalize:
        mean = torch.tensor(normalize["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(normalize["std"], dtype=torch.float32).view(1, -1, 1, 1)
    else:
        mean, std = torch.zeros(1), torch.ones(1)
    return model, layer, mean, std
