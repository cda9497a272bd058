"""Which form computes a layer's per-sample weight-gradient norm cheaper: direct or Gram."""
from __future__ import annotations

from gradprobe.base.manifest import ConvSpec


def form_costs(spec: ConvSpec, positions: int) -> dict[str, int]:
    """Multiply-adds per sample: direct = T*out*patch; Gram = T^2*(out/groups + patch) per group."""
    out_per_group = spec.out_channels // spec.groups
    direct = positions * spec.out_channels * spec.patch_size
    gram = positions * positions * (out_per_group + spec.patch_size) * spec.groups
    return {"direct": direct, "gram": gram}


def choose_form(spec: ConvSpec, positions: int) -> str:
    """'gram' when it is cheaper (few positions, wide layers: late convs), else 'direct'."""
    costs = form_costs(spec, positions)
    return "gram" if costs["gram"] < costs["direct"] else "direct"
