"""``ProbeEngine``: a backend running a bundle's probe graph, in chunks, with the per-layer norms completed.

The engine is what every caller runs a graph through (the SDK facade, the export's verification, the
benchmarks): it checks the graph against the manifest once, validates each call's inputs once, splits
large batches, and fills the conv-weight norms the graph left to the kernels from the taps it emits —
with the numpy kernels for host arrays and the CUDA kernels for device arrays — then drops the taps.
Then it runs the bundle's heads (``manifest.heads``: small second graphs such as the contrastive MLP) in
order on the same backend kind, each fed probe outputs by name, and merges their outputs in: one call.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from gradprobe.base.errors import BundleError, InputError
from gradprobe.base.manifest import Manifest

from .backend import Backend, create_backend
from .validate import validate_images


def _same_spec(declared, actual) -> bool:
    """Same dtype and rank; each dim the same fixed size, or free (named) in both."""
    return declared.dtype == actual.dtype and len(declared.shape) == len(actual.shape) and all(
        (isinstance(a, str) and isinstance(b, str)) or (isinstance(a, int) and a == b)
        for a, b in zip(declared.shape, actual.shape))


class ProbeEngine:
    """Runs ``backend`` for ``manifest``: ``infer(images, feeds) -> {output name: array}``.

    ``heads``: a backend per head the manifest declares, by head name (``build_engine`` makes them all).
    """

    def __init__(self, backend: Backend, manifest: Manifest, *, max_batch: int = 256,
                 heads: Mapping[str, Backend] | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InputError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.backend, self.manifest, self.max_batch = backend, manifest, max_batch
        declared_in = [spec.name for spec in manifest.inputs]
        declared_out = [spec.name for spec in manifest.outputs]
        if backend.input_names != declared_in or backend.output_names != declared_out:
            raise BundleError(f"the graph is not the one its manifest describes: inputs {backend.input_names} "
                              f"(manifest {declared_in}), outputs {backend.output_names[:12]} "
                              f"(manifest {declared_out[:12]})")
        different = [f"{mine.name}: manifest {mine.dtype} {list(mine.shape)}, graph {real.dtype} {list(real.shape)}"
                     for mine, real in zip((*manifest.inputs, *manifest.outputs),
                                           (*backend.input_specs, *backend.output_specs))
                     if not _same_spec(mine, real)]
        if different:
            raise BundleError(f"the graph is not the one its manifest describes: {'; '.join(different[:4])}")
        self.taps = manifest.classifier.layer_grads.taps if manifest.kind == "classifier" and \
            manifest.classifier.layer_grads else ()
        self.output_names = [name for name in declared_out
                             if name not in {n for tap in self.taps for n in (tap.input, tap.grad)}]
        self.heads = self._check_heads(manifest, dict(heads or {}))
        self.output_names += [name for spec, _ in self.heads for name in spec.output_names]

    @staticmethod
    def _check_heads(manifest: Manifest, heads: dict) -> list:
        declared = [spec.name for spec in manifest.heads]
        if sorted(heads) != sorted(declared):
            raise BundleError(f"the manifest declares heads {declared} but the engine was given backends for "
                              f"{sorted(heads)}; build it with gradprobe.runtime.build_engine(manifest, files)")
        for spec in manifest.heads:
            backend = heads[spec.name]
            if backend.input_names != spec.input_names or backend.output_names != spec.output_names:
                raise BundleError(f"head {spec.name!r}: its graph ({backend.input_names} -> {backend.output_names}) "
                                  f"is not the one the manifest describes ({spec.input_names} -> {spec.output_names})")
        return [(spec, heads[spec.name]) for spec in manifest.heads]

    def validate(self, images) -> np.ndarray:
        return validate_images(images, self.manifest.input.shape, self.manifest.input.range)

    def infer(self, images, feeds: dict | None = None, *, validated: bool = False) -> dict[str, np.ndarray]:
        """Every output but the taps, for ``images`` (validated here unless ``validated``) and the graph's
        other inputs in ``feeds`` (one row per image)."""
        images = images if validated else self.validate(images)
        feeds = feeds or {}
        for name, value in feeds.items():
            if len(value) != len(images):
                raise InputError(f"{name} has {len(value)} rows for {len(images)} images")
        chunks = []
        for start in range(0, len(images), self.max_batch):
            part = {"images": images[start:start + self.max_batch],
                    **{name: value[start:start + self.max_batch] for name, value in feeds.items()}}
            chunks.append(self._run_heads(self.backend.finish(self._complete(self.backend.infer(part)))))
        if len(chunks) == 1:
            return chunks[0]
        if any(not isinstance(value, np.ndarray) for value in chunks[0].values()):
            raise InputError(f"device outputs come one chunk at a time: pass at most {self.max_batch} images per "
                             "call, or ask the backend for host outputs")
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}

    def _complete(self, outputs: dict) -> dict:
        if not self.taps:
            return outputs
        from gradprobe import kernels

        for tap in self.taps:
            x, grad = outputs.pop(tap.input), outputs.pop(tap.grad)
            spec = tap.conv
            if x.shape[1] != spec.in_channels or grad.shape[1] != spec.out_channels or \
                    tuple(grad.shape[2:]) != spec.output_size(*x.shape[2:]):
                raise BundleError(f"tap {tap.input}/{tap.grad} of shape {list(x.shape)}/{list(grad.shape)} does not "
                                  f"fit its convolution {spec} in the manifest")
            kernels.write_tap_column(outputs["layer_grad_sqnorm"], tap.column, x, grad, spec)
        return outputs

    def _run_heads(self, outputs: dict) -> dict:
        for spec, backend in self.heads:
            outputs.update(backend.infer({name: outputs[name] for name in spec.input_names}))
        return outputs

    def describe(self) -> dict:
        return {**self.backend.describe(), **({"heads": [spec.name for spec, _ in self.heads]} if self.heads else {})}

    def close(self) -> None:
        self.backend.close()
        for _, backend in self.heads:
            backend.close()


def graph_initializers(manifest: Manifest, files: Mapping[str, bytes]) -> dict[str, np.ndarray] | None:
    """The graph's initializers kept beside it (``manifest.graph_weights``), as read-only views of the verified
    weights bytes; None for a graph that holds its own."""
    weights = manifest.graph_weights
    if weights is None:
        return None
    data = files[weights.file]
    return {tensor.name: np.frombuffer(data, np.dtype(tensor.dtype), math.prod(tensor.shape), tensor.offset)
            .reshape(tensor.shape) for tensor in weights.tensors}


def build_engine(manifest: Manifest, files: Mapping[str, bytes], backend: str = "onnxruntime", *,
                 max_batch: int = 256, bundle=None, **options) -> ProbeEngine:
    """The engine of a bundle: its probe graph and every head graph (``files``: name -> verified bytes), each
    on a backend ``backend`` created with the same ``options``; ``bundle`` (for backends that keep compiled
    engines in it) and the graph's weights where they lie apart go to the probe graph's backend."""
    heads = {}
    try:
        for spec in manifest.heads:
            heads[spec.name] = create_backend(backend, files[spec.file], **options)
        initializers = graph_initializers(manifest, files)
        graph_options = dict(options, initializers=initializers) if initializers is not None else options
        return ProbeEngine(create_backend(backend, files[manifest.graph], bundle=bundle, **graph_options),
                           manifest, max_batch=max_batch, heads=heads)
    except BaseException:
        for made in heads.values():
            made.close()
        raise
