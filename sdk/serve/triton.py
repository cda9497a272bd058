"""``gradprobe serve BUNDLE``: the probe behind Triton Inference Server, through PyTriton.

Triton does the serving (HTTP and gRPC endpoints, health and readiness, dynamic batching, request
queueing); this module only binds ``Probe`` to it. Model ``gradprobe`` (``--model-name``):

- inputs ``images`` float32 [-1, C, H, W] in [0, 1]; optional ``contrast`` int64 [-1, 1] (-1 = runner-up);
  optional ``maps`` bool [-1, 1]: a request with a true row also gets the normalised maps (``Probe.explain``,
  computed for the true rows only; its other rows get zero maps).
- outputs every probe output, ``detector_score`` / ``is_anomalous`` when the bundle is calibrated, and
  ``cam_map`` / ``contrastive_cam_map`` / ``counterfactual_cam_map`` [H, W]; per-image scalars come as [-1, 1].

Triton refuses a wrong dtype, rank, image size or a batch over ``--max-batch`` per request, before any
batching (its message names the expected value); NaN/Inf pixels and unknown contrast classes reach
gradprobe's checks and are answered with its ``InputError`` message. PyTriton answers a dynamic batch
with one error, so a request merged with an invalid one fails too, with a message naming the invalid one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from gradprobe import BackendUnavailableError, InputError

from .outputs import detect_or_none, is_map, output_specs, probe_outputs

EXTRA = "pip install 'gradprobe[serve]'"
MODEL_NAME = "gradprobe"


def _import_pytriton():
    try:
        import pytriton.triton  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(f"serving needs PyTriton (it ships Triton Inference Server): {EXTRA}") from error
    import pytriton

    return pytriton


def check_stub_interpreter() -> None:
    """Refuse an interpreter that PyTriton's Python-backend stub cannot run under.

    The stub is linked against the system ``libpython3.X.so.1.0`` but runs this interpreter's standard
    library; when the two are different builds (a pyenv 3.11.7 stdlib over Debian's 3.11.2 library) the
    stub dies at start (``'_thread.RLock' object has no attribute '_recursion_count'``) and Triton never
    gets ready. Debian's own ``/usr/bin/python3.X`` matches its library.
    """
    import pytriton

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs" / version / \
        "triton_python_backend_stub"
    if not stub.is_file():
        raise BackendUnavailableError(f"PyTriton {getattr(pytriton, '__version__', '')} has no Python-backend stub "
                                      f"for Python {version}; use a Python it ships one for")
    try:
        linked = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return  # no ldd: nothing to compare; Triton's own start-up error will tell
    library = next((line.split("=>")[1].split("(")[0].strip() for line in linked.splitlines()
                    if "libpython" in line and "=>" in line), "")
    if not library or library == "not found":
        raise BackendUnavailableError(f"PyTriton's stub needs libpython{version}.so.1.0, which is not installed: "
                                      f"apt-get install libpython{version}")
    if "nvidia_pytriton.libs" in library:
        return  # the wheel ships its own libpython for this version
    lib = ctypes.CDLL(library)
    lib.Py_GetVersion.restype = ctypes.c_char_p
    theirs = lib.Py_GetVersion().decode().split()[0]
    if theirs != platform.python_version():
        raise BackendUnavailableError(
            f"PyTriton's Python-backend stub runs on {library} (Python {theirs}) but this interpreter "
            f"({sys.executable}) is Python {platform.python_version()}, a different build: the stub would fail "
            f"to start. Serve from a venv made with the system's own interpreter, e.g. "
            f"`/usr/bin/python{version} -m venv .venv-serve` (`make serve-setup` does it)")


def _check(probe, images, contrast):
    """gradprobe's own input checks for one request, without running the engine (InputError on failure):
    the engine's image check (shape, dtype, finite, the bundle's value range) and the class check."""
    from gradprobe.runtime import validate_contrast

    probe.engine.validate(images)
    validate_contrast(contrast, len(images), probe.class_names)


def _column(request, name: str, rows: int, fill, dtype) -> np.ndarray:
    """Optional per-image input ``name`` [n, 1] of one request as a flat [n] array (``fill`` when absent)."""
    if name not in request.data:
        return np.full(rows, fill, dtype=dtype)
    value = np.asarray(request.data[name])
    if value.shape not in ((rows, 1), (rows,)):
        raise InputError(f"{name} must have one value per image, shape [{rows}, 1]; got {list(value.shape)}")
    return value.reshape(rows).astype(dtype)


def make_infer(probe, calibrated: bool, outputs: dict):
    """The PyTriton inference callable for one model instance: a dynamic batch of requests -> one response each.

    The batch runs as one ``Probe`` call (two when a calibrated bundle is asked for explicit contrast
    classes: ``detect`` always uses the runner-up); maps are computed only for the rows that asked.
    """
    def infer(requests):
        sizes = [len(r.data["images"]) for r in requests]
        images = [np.asarray(r.data["images"]) for r in requests]
        contrast = [_column(r, "contrast", n, -1, np.int64) for r, n in zip(requests, sizes)]
        wants_maps = [_column(r, "maps", n, False, bool) for r, n in zip(requests, sizes)]
        problems = []
        for index, (batch, classes) in enumerate(zip(images, contrast)):
            try:
                _check(probe, batch, classes)
            except InputError as error:
                problems.append(f"request {index + 1} of {len(requests)} in this batch: {error}")
        if problems:
            raise InputError("; ".join(problems))
        images, contrast, wants_maps = (np.concatenate(part) for part in (images, contrast, wants_maps))
        detection = detect_or_none(probe, images) if calibrated else None
        if detection is not None and (contrast == -1).all():
            result = detection.probe
        else:
            result = probe.run(images, contrast)
        arrays = probe_outputs(result, detection)
        if wants_maps.any():
            rows = np.flatnonzero(wants_maps)
            explanation = probe.explain(images[rows], contrast[rows])
            for name, maps in probe_outputs(result, None, explanation).items():
                if is_map(name):
                    arrays[name] = np.zeros((len(images), *maps.shape[1:]), maps.dtype)
                    arrays[name][rows] = maps
        responses, start = [], 0
        for request, size in zip(requests, sizes):
            stop = start + size
            asked = set(request.requested_output_names or outputs)
            answer = {name: array[start:stop].reshape(size, *outputs[name][1]).astype(outputs[name][0], copy=False)
                      for name, array in arrays.items() if name in outputs and name in asked}
            if not wants_maps[start:stop].any():
                answer = {name: array for name, array in answer.items() if not is_map(name)}
            responses.append(answer)
            start = stop
        return responses

    return infer


def _triton_shape(shape: tuple) -> tuple:
    return shape or (1,)  # Triton wants at least one dim per image: a per-image scalar is [1]


def serve(bundle, *, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001, max_batch: int = 64,
          max_queue_delay_us: int = 1000, instances: int = 1, threads: int | None = None,
          model_name: str = MODEL_NAME, log_verbose: int = 0) -> None:
    """Serve ``bundle`` until SIGINT/SIGTERM. ``max_batch`` caps one request and one dynamic batch (memory);
    ``instances`` model instances, each with its own ``Probe`` (``threads`` ONNX Runtime threads each)."""
    _import_pytriton()
    check_stub_interpreter()
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    import gradprobe

    for name, value, least in (("max-batch", max_batch, 1), ("instances", instances, 1),
                               ("max-queue-delay-us", max_queue_delay_us, 0)):
        if not isinstance(value, int) or value < least:
            raise InputError(f"--{name} must be an integer >= {least}, got {value!r}")
    probes = [gradprobe.load(bundle, max_batch=max_batch, threads=threads, spinning=False) for _ in range(instances)]
    specs = output_specs(probes[0], maps=True)
    calibrated = "detector_score" in specs
    specs = {name: (dtype, _triton_shape(shape)) for name, (dtype, shape) in specs.items()}
    inputs = [Tensor(name="images", dtype=np.float32, shape=tuple(probes[0].input_shape)),
              Tensor(name="contrast", dtype=np.int64, shape=(1,), optional=True),
              Tensor(name="maps", dtype=np.bool_, shape=(1,), optional=True)]
    config = TritonConfig(http_address=host, grpc_address=host, http_port=http_port, grpc_port=grpc_port,
                          allow_metrics=False, strict_readiness=True, exit_timeout_secs=2, log_verbose=log_verbose)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with Triton(config=config) as triton:
            triton.bind(model_name=model_name, infer_func=[make_infer(p, calibrated, specs) for p in probes],
                        inputs=inputs,
                        outputs=[Tensor(name=name, dtype=dtype, shape=shape) for name, (dtype, shape) in specs.items()],
                        config=ModelConfig(max_batch_size=max_batch,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us)),
                        strict=True)
            triton.run()
            watchdog = _start_watchdog()
            logging.getLogger("gradprobe").info("serving %s as %r on %s (http %d, grpc %d)", bundle, model_name,
                                                host, http_port, grpc_port)
            print(f"gradprobe serve: {model_name!r} ready on http://{host}:{http_port} and grpc {host}:{grpc_port} "
                  f"(max batch {max_batch}, {instances} instance(s); outputs {', '.join(specs)})", flush=True)
            try:
                triton.serve()
            finally:
                if watchdog is not None:
                    watchdog.terminate()  # a clean stop: Triton is stopped by PyTriton, nothing to kill
                    watchdog.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


#: Runs beside the server: when the server process dies (even SIGKILL), SIGKILL its tritonserver at once.
#: PyTriton only sends Triton SIGTERM then, and Triton holds in-flight requests open while it shuts
#: down; with the proxy gone they can never be answered, so clients would wait out their timeouts.
_WATCHDOG = """
import ctypes, os, signal, sys
pid = int(sys.argv[1])
def kill(*_):
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() == "tritonserver":
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(0)
signal.signal(signal.SIGUSR1, kill)
ctypes.CDLL(None).prctl(1, int(signal.SIGUSR1))  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[2]):
    kill()
while True:
    signal.pause()
"""


def _start_watchdog():
    """The watchdog process for this server's tritonserver child, or None when there is none to watch."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if int(fields[1]) == me and name == "tritonserver":
            return subprocess.Popen([sys.executable, "-c", _WATCHDOG, entry, str(me)])
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # PyTriton stops Triton cleanly on KeyboardInterrupt


def _serve_command(args) -> None:
    serve(args.bundle, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, max_batch=args.max_batch,
          max_queue_delay_us=args.max_queue_delay_us, instances=args.instances, threads=args.threads,
          model_name=args.model_name, log_verbose=args.log_verbose)


def add_serve_command(subparsers) -> None:
    """Register ``gradprobe serve BUNDLE [--host] [--http-port] [--grpc-port] [--max-batch] ...``."""
    command = subparsers.add_parser(
        "serve", help="serve a bundle through Triton Inference Server (HTTP + gRPC, dynamic batching)",
        description="Health: GET /v2/health/live and /v2/health/ready; model metadata: GET /v2/models/NAME. "
                    f"Needs the [serve] extra: {EXTRA}.")
    command.add_argument("bundle", help="bundle directory from `gradprobe export`")
    command.add_argument("--host", default="127.0.0.1",
                         help="address to bind HTTP and gRPC to (default 127.0.0.1: this machine only)")
    command.add_argument("--http-port", type=int, default=8000)
    command.add_argument("--grpc-port", type=int, default=8001)
    command.add_argument("--max-batch", type=int, default=64,
                         help="largest request and largest dynamic batch, in images (default 64): bounds memory")
    command.add_argument("--max-queue-delay-us", type=int, default=1000,
                         help="how long the dynamic batcher waits to fill a batch, in microseconds (default 1000)")
    command.add_argument("--instances", type=int, default=1, help="model instances, each with its own Probe")
    command.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per instance")
    command.add_argument("--model-name", default=MODEL_NAME)
    command.add_argument("--log-verbose", type=int, default=0, help="Triton's verbose log level (0 = off)")
    command.set_defaults(handler=_serve_command)
