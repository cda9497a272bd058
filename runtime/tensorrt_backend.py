"""TensorRT backend: a bundle's prebuilt engine, run with ``execute_async_v3`` on a cuda-python stream.

The engine comes from the bundle (``gradprobe build BUNDLE`` writes it, keyed by TensorRT version, GPU,
compute capability, precision and batch profile); an engine built for another GPU, another TensorRT or
another graph is refused with the command that rebuilds it, before TensorRT is asked to load it.

I/O tensors are addressed by name. Device buffers are allocated once per tensor, at the largest batch
seen, and reused for every smaller one; inputs already on the GPU (``__cuda_array_interface__`` or
DLPack) are bound where they are, with no copy. ``infer`` returns device arrays on the backend's stream,
so the runtime engine completes the per-layer norms with the CUDA kernels on that stream; ``finish``
then copies the results to the host (``outputs="host"``, the default) or hands the device arrays over
(``outputs="device"``: they are views of the reused buffers, valid until the next call).
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np

from gradprobe.base.errors import BackendUnavailableError, BundleError, GradprobeError, InputError
from gradprobe.base.manifest import PRECISIONS, EngineRecord, Manifest, TensorSpec

from . import cuda
from .backend import FixedSpecsBackend

BUILD_HINT = "gradprobe build {bundle}{fp16}"


def import_tensorrt():
    """The ``tensorrt`` package, or a BackendUnavailableError naming the extra that installs it."""
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailableError("TensorRT is not installed: pip install 'gradprobe[gpu]' (the tensorrt wheel "
                                      "needs an NVIDIA GPU and driver to run)") from error
    return tensorrt


_LOGGER = None


def trt_logger(trt):
    """One TensorRT logger per process (TensorRT expects the same logger for builder and runtime)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def rebuild_hint(bundle: str, precision: str) -> str:
    return BUILD_HINT.format(bundle=bundle, fp16=" --fp16" if precision == "fp16" else "")


def select_engine(manifest: Manifest, *, bundle: str, tensorrt: str, gpu: str, compute_capability: tuple,
                  precision: str, graph_sha256: str) -> EngineRecord:
    """The engine record this machine can run, or a BundleError saying why none fits and how to rebuild.

    An engine fits when it was built with this TensorRT version, for this GPU model and compute capability,
    from this graph and in the requested precision; among several (other batch profiles), the widest."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    hint = rebuild_hint(bundle, precision)
    here = f"TensorRT {tensorrt} on {gpu} (sm_{compute_capability[0]}{compute_capability[1]})"
    if not manifest.engines:
        raise BundleError(f"{bundle} holds no TensorRT engine; build one for {here} with: {hint}")
    fitting, reasons = [], []
    for record in manifest.engines:
        made = f"{record.file} was built with TensorRT {record.tensorrt} for {record.gpu} " \
               f"(sm_{record.compute_capability[0]}{record.compute_capability[1]}), {record.precision}"
        if record.graph_sha256 != graph_sha256:
            reasons.append(f"{made}, from another graph (stale)")
        elif record.tensorrt != tensorrt:
            reasons.append(f"{made} (stale: this is TensorRT {tensorrt})")
        elif (record.gpu, tuple(record.compute_capability)) != (gpu, tuple(compute_capability)):
            reasons.append(f"{made} (foreign to this {gpu})")
        elif record.precision != precision:
            reasons.append(f"{made} (not {precision})")
        else:
            fitting.append(record)
    if not fitting:
        raise BundleError(f"{bundle} has no TensorRT engine for {here}, {precision}: " + "; ".join(reasons) +
                          f". Rebuild it on this machine with: {hint}")
    return max(fitting, key=lambda r: (r.profile[2], r.built))


def _shape_of(dims) -> tuple:
    return tuple(int(d) if int(d) >= 0 else "batch" for d in dims)


class TensorRTBackend(FixedSpecsBackend):
    """``engine``: a serialized plan (default: the bundle's engine for this GPU); ``precision``: "fp32"
    (default) or "fp16"; ``outputs``: "host" (numpy) or "device" (``DeviceArray`` views, reused per call);
    ``device``: CUDA device ordinal; ``initializers`` (weights kept beside the graph) go unused: a built engine
    holds its weights."""

    name = "tensorrt"
    reads_bundle = True

    def __init__(self, model: bytes, *, bundle=None, engine: bytes | None = None, precision: str | None = None,
                 outputs: str = "host", device: int = 0, initializers=None):
        if outputs not in ("host", "device"):
            raise InputError(f"outputs must be 'host' or 'device', got {outputs!r}")
        trt = import_tensorrt()
        self.trt, self.outputs_on, self.precision = trt, outputs, precision or "fp32"
        self.device = cuda.device(device)
        self.record, order = None, None
        if engine is None:
            if bundle is None:
                raise InputError("the TensorRT backend needs an engine: load a bundle built with `gradprobe build`, "
                                 "or pass engine=<serialized plan bytes>")
            self.record = select_engine(bundle.manifest, bundle=str(bundle.path), tensorrt=trt.__version__,
                                        gpu=self.device.name, compute_capability=self.device.compute_capability,
                                        precision=self.precision, graph_sha256=hashlib.sha256(model).hexdigest())
            engine = bundle.read(self.record.file)
            order = [s.name for s in bundle.manifest.inputs], [s.name for s in bundle.manifest.outputs]
        self.runtime = trt.Runtime(trt_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(engine)
        if self.engine is None:
            where = str(bundle.path) if bundle is not None else "BUNDLE"
            raise BundleError(f"TensorRT {trt.__version__} could not load the engine (built by another TensorRT "
                              f"version or for another GPU, or damaged); rebuild it with: "
                              f"{rebuild_hint(where, self.precision)}")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs, outputs_ = [n for n in names if is_input[n]], [n for n in names if not is_input[n]]
        if order is not None:
            if sorted(order[0]) != sorted(inputs) or sorted(order[1]) != sorted(outputs_):
                raise BundleError(f"the engine's tensors {sorted(names)[:12]} are not the graph's; rebuild it with: "
                                  f"{rebuild_hint(str(bundle.path), self.precision)}")
            inputs, outputs_ = order
        self._inputs = [self._spec(n) for n in inputs]
        self._outputs = [self._spec(n) for n in outputs_]
        first = inputs[0]
        self.max_batch = int(self.engine.get_tensor_profile_shape(first, 0)[2][0])
        self._buffers: dict[str, cuda.DeviceArray] = {}

    def _spec(self, name: str) -> TensorSpec:
        dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))).name
        return TensorSpec(name, dtype, _shape_of(self.engine.get_tensor_shape(name)))

    def describe(self) -> dict:
        described = {"backend": self.name, "tensorrt": self.trt.__version__, "gpu": self.device.name,
                     "compute_capability": f"{self.device.compute_capability[0]}.{self.device.compute_capability[1]}",
                     "precision": self.precision, "max_batch": self.max_batch, "outputs": self.outputs_on}
        if self.record is not None:
            described["engine"] = self.record.file
        return described

    def check_feeds(self, feeds: Mapping) -> None:
        """The base checks, on device arrays too (read through their interface, never copied)."""
        super().check_feeds({name: cuda.as_device_array(value) if cuda.is_device_array(value) else value
                             for name, value in feeds.items()})
        batch = len(feeds[self._inputs[0].name])
        if batch > self.max_batch:
            raise InputError(f"the TensorRT engine takes batches up to {self.max_batch}, got {batch}: load with "
                             f"max_batch={self.max_batch}, or rebuild with --batch 1:32:{batch}")

    def _buffer(self, name: str, shape: tuple, dtype) -> cuda.DeviceArray:
        """A view of ``name``'s device buffer for ``shape``: allocated once, grown only for a larger batch."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buffer = self._buffers.get(name)
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.free()
            buffer = self._buffers[name] = cuda.DeviceArray.empty((max(nbytes, 1),), "uint8",
                                                                   stream=self.stream.handle)
        return buffer.view(shape, dtype)

    def _infer(self, feeds: Mapping) -> dict:
        cuda.device(self.device.ordinal)
        stream = self.stream.handle
        keep = []  # host arrays and foreign views stay referenced until the work is queued
        for spec in self._inputs:
            value = feeds[spec.name]
            if cuda.is_device_array(value):
                array = cuda.as_device_array(value, stream)  # zero-copy: bound where it lies
                if array.stream not in (None, stream):  # the producer's queued work must finish first
                    cuda.check(cuda.driver().cuStreamSynchronize(array.stream), "cuStreamSynchronize")
            else:
                host = np.ascontiguousarray(value, dtype=spec.dtype)
                array = self._buffer(spec.name, host.shape, spec.dtype).copy_from_host(host, stream)
                keep.append(host)
            keep.append(array)
            if tuple(self.context.get_tensor_shape(spec.name)) != array.shape and \
                    not self.context.set_input_shape(spec.name, array.shape):
                raise InputError(f"TensorRT refused shape {list(array.shape)} for input {spec.name!r}")
            if not self.context.set_tensor_address(spec.name, array.pointer):
                raise GradprobeError(f"TensorRT refused the address of input {spec.name!r}")
        missing = self.context.infer_shapes()
        if missing:
            raise InputError(f"TensorRT could not infer output shapes; inputs not specified: {missing}")
        results = {}
        for spec in self._outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            array = results[spec.name] = self._buffer(spec.name, shape, spec.dtype)
            if not self.context.set_tensor_address(spec.name, array.pointer):
                raise GradprobeError(f"TensorRT refused the address of output {spec.name!r}")
        if not self.context.execute_async_v3(stream):
            raise GradprobeError("TensorRT execute_async_v3 failed (see TensorRT's log above)")
        del keep  # pageable host copies are staged by the driver before cuMemcpyHtoDAsync returns
        return results

    def finish(self, outputs: dict) -> dict:
        if self.outputs_on == "device":
            return outputs
        host = {name: value.copy_to_host(stream=self.stream.handle) if isinstance(value, cuda.DeviceArray) else value
                for name, value in outputs.items()}
        self.stream.synchronize()
        return host

    def close(self) -> None:
        for buffer in getattr(self, "_buffers", {}).values():
            buffer.free()
        self._buffers = {}
        if getattr(self, "stream", None) is not None:
            self.stream.close()
            self.stream = None
        self.context = self.engine = None

