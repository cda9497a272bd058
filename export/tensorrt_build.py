"""``gradprobe build BUNDLE``: a TensorRT engine from the bundle's probe graph, stored in the bundle.

Lives in export/ because it is a compile step that writes into the bundle, like export; it needs
TensorRT (and onnx for ``--fp16``) but no torch, so it runs on the deployment machine, which is where
an engine must be built: TensorRT engines run only on the GPU model and TensorRT version that built them.

The build uses the current TensorRT Python API only: a strongly typed network (the flag on TensorRT 10,
the only mode from 11; ``--fp16`` therefore rewrites the graph with explicit float16 casts, see
``export/fp16.py``, instead of setting a builder flag), one optimisation profile over the dynamic batch,
a workspace limit through ``set_memory_pool_limit`` and a timing cache that later builds reuse. The
engine is added to the bundle under its key (TensorRT version, GPU, compute capability, precision,
profile) through ``update_bundle``: an atomic write under the bundle's writer lock, replacing an engine
of the same key and keeping every other.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import time
from pathlib import Path

from gradprobe.base.bundle import Bundle, update_bundle
from gradprobe.base.errors import ExportError, InputError
from gradprobe.base.fileio import atomic_write_bytes
from gradprobe.base.manifest import MAX_ENGINE_BATCH, EngineRecord, Manifest

DEFAULT_PROFILE = (1, 32, 256)


def parse_profile(text: str) -> tuple[int, int, int]:
    """``"MIN:OPT:MAX"`` batch sizes (or one number for a fixed batch) -> (min, opt, max)."""
    try:
        values = tuple(int(v) for v in str(text).split(":"))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2] <= MAX_ENGINE_BATCH:
        raise InputError(f"--batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= {MAX_ENGINE_BATCH}, "
                         f"got {text!r}")
    return values


def engine_file_name(record_key: tuple, plan: bytes) -> str:
    """``engine-<8 hex of the key><8 hex of the content>.plan``: a fresh name for every build, so a rebuild is
    one atomic manifest swap (the new file is written beside the old one, which goes after the swap)."""
    key = hashlib.sha256(repr(record_key).encode()).hexdigest()[:8]
    return f"engine-{key}{hashlib.sha256(plan).hexdigest()[:8]}.plan"


def default_timing_cache(tensorrt: str, device) -> Path:
    """Per user, TensorRT version and GPU model: a cache from elsewhere would only be ignored."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    gpu = "".join(c if c.isalnum() else "-" for c in device.name)
    return root / "gradprobe" / "tensorrt" / f"timing-{tensorrt}-{gpu}-{device.sm}.cache"


def profile_shapes(shape: tuple, profile: tuple) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) shapes of a network input whose dynamic dims (-1) are the batch."""
    if sum(1 for d in shape if d < 0) > 1 or (any(d < 0 for d in shape) and shape[0] >= 0):
        raise ExportError(f"input shape {list(shape)}: only the first (batch) dimension may be dynamic")
    return tuple(tuple(size if d < 0 else d for d in shape) for size in profile)


def _network_flags(trt) -> int:
    """STRONGLY_TYPED where it is a choice (TensorRT 10.x); TensorRT 11 builds strongly typed only and
    deprecates the flag, so none is passed there."""
    major = int(trt.__version__.split(".")[0])
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major >= 11 or flag is None:
        return 0
    return 1 << int(flag)


def _timing_cache(config, path: Path):
    """The timing cache at ``path`` attached to ``config`` (an empty one when absent or unusable)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # TensorRT raises its own error types on a damaged cache
        cache = None
    if cache is None or not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")  # written by another TensorRT or GPU: start afresh
        config.set_timing_cache(cache, False)
    return cache


def _save_timing_cache(config, path: Path) -> None:
    from filelock import FileLock

    cache = config.get_timing_cache()
    if cache is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        if path.is_file():  # another build may have added entries meanwhile: keep them
            try:
                previous = config.create_timing_cache(path.read_bytes())
            except Exception:
                previous = None
            if previous is not None:
                cache.combine(previous, False)
        atomic_write_bytes(path, bytes(memoryview(cache.serialize())))


def build_engine(bundle, *, fp16: bool = False, batch=DEFAULT_PROFILE, workspace_mib: int | None = None,
                 timing_cache: str | os.PathLike | None = None, device: int = 0, log=print) -> EngineRecord:
    """Build a TensorRT engine for ``bundle`` on this machine's GPU ``device`` and store it in the bundle.

    ``batch``: (min, opt, max) batch sizes or "MIN:OPT:MAX"; ``workspace_mib``: the builder's workspace
    limit (default: TensorRT's, the device memory); ``timing_cache``: file of tactic timings reused
    across builds (default: per user, TensorRT and GPU under ~/.cache/gradprobe). Returns the record.
    """
    from gradprobe.runtime import cuda
    from gradprobe.runtime.tensorrt_backend import import_tensorrt, trt_logger

    profile = parse_profile(":".join(map(str, batch)) if isinstance(batch, (tuple, list)) else batch)
    if workspace_mib is not None and (isinstance(workspace_mib, bool) or not isinstance(workspace_mib, int)
                                      or not 1 <= workspace_mib <= 1 << 20):
        raise InputError(f"--workspace-mib must be a positive integer, got {workspace_mib!r}")
    opened = Bundle.open(bundle)
    if opened.manifest.graph_weights is not None:
        raise ExportError(f"{opened.path} keeps its weights beside the graph ({opened.manifest.graph_weights.file}, "
                          "a model over 2 GiB): building TensorRT engines of such bundles is not supported yet; "
                          "run it with ONNX Runtime")
    trt = import_tensorrt()
    gpu = cuda.device(device)
    graph = opened.read(opened.manifest.graph)
    precision = "fp16" if fp16 else "fp32"
    if fp16:
        from .fp16 import to_fp16

        graph_to_build = to_fp16(graph)
    else:
        graph_to_build = graph

    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph_to_build) or parser.num_errors:
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {opened.path / opened.manifest.graph}: "
                          f"{problems or 'no reason given'}")
    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    optimisation = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        optimisation.set_shape(tensor.name, *profile_shapes(tuple(tensor.shape), profile))
    if config.add_optimization_profile(optimisation) < 0:
        raise ExportError(f"TensorRT refused the optimisation profile for batches {profile}")
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(trt.__version__, gpu)
    _timing_cache(config, cache_path)

    log(f"building a {precision} TensorRT {trt.__version__} engine for {gpu.name} ({gpu.sm}), "
        f"batch {profile[0]}:{profile[1]}:{profile[2]}")
    started = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError("TensorRT could not build an engine from the probe graph (see TensorRT's log above)")
    plan = bytes(memoryview(plan))
    _save_timing_cache(config, cache_path)

    record = EngineRecord("", trt.__version__, gpu.name, gpu.compute_capability, precision, profile,
                          hashlib.sha256(graph).hexdigest(), workspace_mib,
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    record = dataclasses.replace(record, file=engine_file_name(record.key, plan))
    store_engine(opened.path, record, plan)
    log(f"wrote {record.file} ({len(plan) / 2**20:.1f} MiB) into {opened.path} "
        f"in {time.perf_counter() - started:.0f} s")
    return record


def store_engine(bundle, record: EngineRecord, plan: bytes) -> Manifest:
    """Add ``plan`` under ``record`` to the bundle, replacing the engine of the same key: one atomic update
    under the bundle's writer lock (the replaced engine's file is deleted after the manifest swap)."""
    def change(manifest: Manifest) -> Manifest:
        if record.graph_sha256 != manifest.files[manifest.graph].sha256:
            raise ExportError(f"{bundle}: the graph changed while the engine was built; build again")
        kept = tuple(e for e in manifest.engines if e.key != record.key)
        return dataclasses.replace(manifest, engines=kept + (record,))

    return update_bundle(bundle, change, {record.file: plan})


def add_build_command(commands) -> None:
    """Register ``gradprobe build`` on the CLI's sub-parsers."""
    build = commands.add_parser("build", help="build a TensorRT engine from the bundle's graph, stored in the bundle",
                                description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    build.add_argument("bundle")
    build.add_argument("--fp16", action="store_true",
                       help="float16 convolutions and matrix products in the forward pass (strongly typed);\n"
                            "backward pass and norms stay float32")
    build.add_argument("--batch", default="1:32:256", help="optimisation profile MIN:OPT:MAX (default 1:32:256)")
    build.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit in MiB")
    build.add_argument("--timing-cache", default=None, help="timing cache file (default under ~/.cache/gradprobe)")
    build.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    build.set_defaults(handler=lambda args: build_engine(args.bundle, fp16=args.fp16, batch=args.batch,
                                                         workspace_mib=args.workspace_mib,
                                                         timing_cache=args.timing_cache, device=args.device))
