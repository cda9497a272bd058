"""Which form computes a layer's per-sample weight-gradient norm cheaper: direct or Gram."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry as the norm kernels need it (a Linear is a 1x1 conv on 1x1 maps)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def patch_size(self) -> int:
        """Length of one group's input patch a_t: in_channels/groups * kh * kw."""
        return self.in_channels // self.groups * self.kernel[0] * self.kernel[1]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        size = []
        for extent, k, s, p, d in zip((height, width), self.kernel, self.stride, self.padding, self.dilation):
            size.append((extent + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(size)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ConvSpec":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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
