"""Sums over many elements, in stages, for the graph's large reductions (squared gradient norms).

ONNX Runtime's CPU ``ReduceSum`` adds a whole reduced axis into one float32 accumulator: the squared sum of
a [2048, 1024] weight gradient as one ``ReduceSum`` comes out 6e-5 off float64 (``ReduceSumSquare`` over
two axes of [6, 2048, 1024]: 1.5e-3), where torch's cascade summation is 1e-7 off. Summed first over
chunks of ``SPAN`` elements and then over the chunk sums, it is 1e-7 off again
(``tests/export/test_reductions.py`` measures both in ONNX Runtime).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: The most elements one reduction adds in the exported graph.
SPAN = 1024


def staged_sum(tensor: torch.Tensor, start_dim: int = 0) -> torch.Tensor:
    """The sum over every dimension from ``start_dim`` on, no reduction adding more than ``SPAN`` elements.
    Shapes are static in the traced graph, so the stages are fixed at export."""
    flat = tensor.flatten(start_dim) if tensor.dim() > start_dim else tensor.unsqueeze(-1)
    while flat.shape[-1] > SPAN:
        short = -flat.shape[-1] % SPAN
        if short:  # zeros change no sum
            flat = F.pad(flat, (0, short))
        flat = flat.reshape(*flat.shape[:-1], -1, SPAN).sum(dim=-1)
    return flat.sum(dim=-1)


def squared_sum(tensor: torch.Tensor, start_dim: int = 0) -> torch.Tensor:
    """``staged_sum`` of the squares: a squared L2 norm over the dimensions from ``start_dim`` on."""
    return staged_sum(tensor * tensor, start_dim)
