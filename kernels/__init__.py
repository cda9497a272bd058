"""Fused per-sample gradient-norm kernels (METHODS.md §6): numpy reference/CPU path and CUDA sources."""
