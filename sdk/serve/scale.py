"""``gradprobe score BUNDLE INPUT OUTPUT``: batch scoring on Ray Data with a pool of Probe actors.

INPUT is one file or a folder of them: PNG/JPEG images (resized to the bundle's input, as
``gradprobe explain`` does), ``.npy`` batches [N, C, H, W] (float32 in [0, 1] or uint8), or Parquet files
with an ``image`` column (encoded PNG/JPEG bytes, or pixels as a list / fixed-shape tensor per row).
Reading runs in Ray tasks, scoring in ``map_batches`` on an actor pool (one ``Probe`` per actor).

OUTPUT is a folder of Parquet parts (``part-NNNNN.parquet``), each written atomically and holding only
whole input files, with the files it covers in its metadata: a run that stops part-way resumes by
input file, exactly. Columns: ``source``, ``index`` (row within the source), ``pred``, ``pred_name``,
``probs`` [C], ``confounding_grad_sqnorm`` [2], ``detector_score`` / ``is_anomalous`` when the bundle is
calibrated, and with ``maps=True`` the normalised ``cam_map`` / ``contrastive_cam_map`` / ``counterfactual_cam_map``
[H, W]; vectors and maps are Arrow fixed-shape tensors.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gradprobe import BackendUnavailableError, InputError

from .outputs import detect_or_none, is_map, probe_outputs

EXTRA = "pip install 'gradprobe[scale]'"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUFFIXES = IMAGE_SUFFIXES + (".npy", ".parquet")
#: The probe outputs written per image (plus the detector's and, on request, the maps).
COLUMNS = ("pred", "probs", "confounding_grad_sqnorm")
META = b"gradprobe"


def _import_scale():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise BackendUnavailableError(f"batch scoring needs Ray Data and pyarrow: {EXTRA}") from error
    return ray


# ------------------------------------------------------------------------------------------------ inputs
def list_sources(path) -> list[Path]:
    """The input files under ``path`` (itself, or a folder's supported files, sorted), or InputError."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    else:
        raise InputError(f"{path}: no such file or folder")
    bad = [p.name for p in files if p.suffix.lower() not in SUFFIXES]
    if bad or not files:
        raise InputError(f"{path}: expected PNG/JPEG images, .npy batches or Parquet files "
                         f"({', '.join(SUFFIXES)}); found {bad or 'none'}")
    return files


def count_images(path: Path) -> int:
    """Images in one source, from its header only (for the progress bar); a .npy of the wrong dtype or
    rank is refused here, before Ray starts."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if array.dtype not in (np.float32, np.uint8) or array.ndim not in (3, 4):
            raise InputError(f"{path}: .npy batches must hold float32 in [0, 1] or uint8 pixels, [N, C, H, W] or "
                             f"[C, H, W]; got {array.dtype} {list(array.shape)}")
        return 1 if array.ndim == 3 else int(array.shape[0])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return 1


def _decode(data: bytes, input_shape) -> np.ndarray:
    import io

    from PIL import Image

    channels, height, width = input_shape
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def read_source(path, input_shape) -> np.ndarray:
    """One source file as float32 [N, C, H, W] (checked by ``Probe.run`` when scored)."""
    path = Path(path)
    if path.suffix.lower() != ".parquet":
        from gradprobe.explain import read_input

        return read_input(path, input_shape)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "image" not in table.column_names:
        raise InputError(f"{path}: Parquet input needs an 'image' column (encoded PNG/JPEG bytes or pixels), "
                         f"found {table.column_names}")
    column = table.column("image").combine_chunks()
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return np.stack([_decode(value.as_py(), input_shape) for value in column]) if len(column) else \
            np.zeros((0, *input_shape), np.float32)
    if isinstance(column.type, pa.FixedShapeTensorType):
        pixels = column.to_numpy_ndarray()
    else:
        pixels = np.array(column.to_pylist())
    pixels = pixels.astype(np.float32) / 255 if pixels.dtype == np.uint8 else pixels.astype(np.float32)
    return pixels.reshape(len(column), *input_shape)


def _read_batch(batch: dict, input_shape) -> dict:
    """One source (a batch of one row) -> its images as numpy columns: no per-row Python objects."""
    (source,) = batch["source"]
    images = read_source(source, input_shape)
    return {"source": np.full(len(images), source, dtype=object), "index": np.arange(len(images)), "image": images}


# ------------------------------------------------------------------------------------------------ scoring
class ProbeActor:
    """One ``Probe`` per Ray actor: loads the bundle once, scores numpy batches (``map_batches``)."""

    def __init__(self, bundle: str, maps: bool = False, threads: int = 1):
        import gradprobe

        self.probe = gradprobe.load(bundle, threads=threads, spinning=False)
        self.maps = maps

    def __call__(self, batch: dict) -> dict:
        return score_batch(self.probe, batch, self.maps)


def score_batch(probe, batch: dict, maps: bool = False) -> dict:
    """``{"source", "index", "image"}`` numpy columns -> the output columns, from one engine call
    (two with maps); the same outputs as ``probe.run`` / ``probe.detect`` on those images."""
    images = np.ascontiguousarray(np.stack(batch["image"]) if batch["image"].dtype == object else batch["image"],
                                  dtype=np.float32)
    detection = detect_or_none(probe, images)
    result = detection.probe if detection is not None else probe.run(images)
    arrays = probe_outputs(result, detection, probe.explain(images) if maps else None)
    out = {"source": batch["source"], "index": batch["index"]}
    out.update({name: arrays[name] for name in COLUMNS})
    out["pred_name"] = np.array([probe.class_names[i] for i in arrays["pred"]], dtype=object)
    out.update({name: array for name, array in arrays.items()
                if name in ("detector_score", "is_anomalous") or is_map(name)})
    return out


# ------------------------------------------------------------------------------------------------ output
def _identity(bundle, maps: bool) -> dict:
    """What a part was scored with: resuming with another bundle (or maps setting) is refused."""
    digest = hashlib.sha256(Path(bundle, "probe.onnx").read_bytes())
    for name in sorted(os.listdir(bundle)):
        if name.startswith("detector-"):
            digest.update(name.encode())  # a re-calibrated detector changes scores too
    return {"bundle": digest.hexdigest(), "maps": bool(maps)}


def _table(rows: dict):
    import pyarrow as pa

    columns = {}
    for name, values in rows.items():
        values = np.asarray(values) if not isinstance(values, np.ndarray) else values
        if values.ndim > 1:
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
        elif values.dtype == object:
            columns[name] = pa.array(values.tolist(), type=pa.string())
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def done_sources(output, identity: dict) -> tuple[set[str], int]:
    """Sources already written to ``output`` by earlier runs, and the next part number."""
    import pyarrow.parquet as pq

    output = Path(output)
    done, last = set(), -1
    for part in sorted(output.glob("part-*.parquet")) if output.is_dir() else ():
        meta = json.loads(pq.read_schema(part).metadata[META])
        if meta["identity"] != identity:
            raise InputError(f"{output} holds results scored with another bundle or maps setting "
                             f"({part.name}); score into a new folder or remove it")
        done.update(meta["sources"])
        last = max(last, int(part.stem.split("-")[1]))
    return done, last + 1


def _write_part(output: Path, number: int, batches: list[dict], sources: list[str], identity: dict) -> Path:
    """Write one part under a temporary name and rename it: a reader (or a resumed run) never sees half a part."""
    import pyarrow.parquet as pq

    rows = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}
    table = _table(rows)
    table = table.replace_schema_metadata({META: json.dumps({"identity": identity, "sources": sources}).encode()})
    path = output / f"part-{number:05d}.parquet"
    temporary = output / f".{path.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def score(bundle, input, output, *, ray_address: str = "local", actors: int = 1, batch: int = 64,
          maps: bool = False, part_rows: int = 4096, cpus: int = 2, progress: bool = True) -> dict:
    """Score every image under ``input`` into Parquet parts under ``output``; returns counts and timing.

    ``ray_address``: "local" starts a private Ray instance with ``cpus`` CPUs; anything else is passed to
    ``ray.init(address=...)`` ("auto", "ray://head:10001"). BUNDLE and INPUT must be readable at the same
    paths on every node; OUTPUT is written by this process only.
    """
    import time

    ray = _import_scale()
    import gradprobe

    for name, value in (("actors", actors), ("batch", batch), ("part_rows", part_rows), ("cpus", cpus)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    bundle, output = Path(bundle).resolve(), Path(output)
    probe = gradprobe.load(bundle)  # fails early on a bad bundle, before Ray starts
    sources = [str(p.resolve()) for p in list_sources(input)]
    identity = _identity(bundle, maps)
    done, number = done_sources(output, identity)
    todo = [s for s in sources if s not in done]
    total = sum(count_images(Path(s)) for s in todo)
    summary = {"sources": len(sources), "skipped": len(sources) - len(todo), "images": total, "parts": 0,
               "actors": actors, "batch": batch}
    if not todo:
        return {**summary, "seconds": 0.0, "images_per_s": None}
    started_ray = not ray.is_initialized()
    if started_ray:
        if ray_address == "local":
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # rows of one source stay together, in order
        context.enable_progress_bars = False
        context.raise_original_map_exception = True  # a worker's InputError, not a UserCodeException
        output.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        dataset = ray.data.from_items([{"source": s} for s in todo], override_num_blocks=len(todo))
        dataset = dataset.map_batches(_read_batch, fn_kwargs={"input_shape": tuple(probe.input_shape)}, batch_size=1,
                                      batch_format="numpy", num_cpus=0)
        dataset = dataset.map_batches(ProbeActor, fn_constructor_kwargs={"bundle": str(bundle), "maps": maps},
                                      batch_size=batch, batch_format="numpy", num_cpus=1,
                                      compute=ray.data.ActorPoolStrategy(size=actors))
        pending, pending_sources, pending_rows, current = [], [], 0, None
        from tqdm.auto import tqdm

        with tqdm(total=total, unit="img", desc="gradprobe score", disable=not progress) as bar, \
                _gradprobe_errors():
            for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                summary.setdefault("first_output_s", time.perf_counter() - start)  # start-up: actors, first read
                pending.append(out)
                for source in dict.fromkeys(out["source"].tolist()):
                    if source != current:
                        if current is not None:
                            pending_sources.append(current)
                        current = source
                pending_rows += len(out["source"])
                bar.update(len(out["source"]))
                if pending_rows >= part_rows and pending_sources:
                    # write every whole source seen so far; the current one may go on in the next batch
                    whole = {name: np.concatenate([b[name] for b in pending]) for name in pending[0]}
                    keep = whole["source"] == current
                    _write_part(output, number, [{k: v[~keep] for k, v in whole.items()}], pending_sources, identity)
                    number, summary["parts"] = number + 1, summary["parts"] + 1
                    pending, pending_sources = [{k: v[keep] for k, v in whole.items()}], []
                    pending_rows = int(keep.sum())
            if current is not None:
                _write_part(output, number, pending, pending_sources + [current], identity)
                summary["parts"] += 1
        seconds = time.perf_counter() - start
    finally:
        if started_ray:
            ray.shutdown()
    return {**summary, "seconds": seconds, "images_per_s": total / seconds if seconds else None}


@contextlib.contextmanager
def _gradprobe_errors():
    """Raise a gradprobe error that a Ray worker raised as itself (Ray wraps it in RayTaskError), so
    callers and the command line get gradprobe's message, not Ray's traceback."""
    from gradprobe import GradprobeError

    try:
        yield
    except Exception as error:
        cause, seen = error, set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, GradprobeError) and not type(cause).__module__.startswith("ray."):
                raise cause from None
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise


def _score_command(args) -> None:
    summary = score(args.bundle, args.input, args.output, ray_address=args.ray, actors=args.actors, batch=args.batch,
                    maps=args.maps, part_rows=args.part_rows, cpus=args.cpus, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def add_score_command(subparsers) -> None:
    """Register ``gradprobe score BUNDLE INPUT OUTPUT [--ray ADDRESS|local] [--actors N] [--batch B]``."""
    command = subparsers.add_parser(
        "score", help="batch-score images with a pool of Probe actors on Ray Data, into Parquet",
        description=f"Resumable by input file: re-running skips the files OUTPUT already holds. Needs the "
                    f"[scale] extra: {EXTRA}.")
    command.add_argument("bundle", help="bundle directory from `gradprobe export` (same path on every node)")
    command.add_argument("input", help="a PNG/JPEG/.npy/Parquet file, or a folder of them")
    command.add_argument("output", help="folder of Parquet parts to write (created)")
    command.add_argument("--ray", default="local", metavar="ADDRESS|local",
                         help="'local' (default): a private Ray instance on this machine; or a cluster "
                              "address for ray.init, e.g. 'auto' on a cluster node or 'ray://HEAD:10001'")
    command.add_argument("--actors", type=int, default=1, help="Probe actors (one CPU each; default 1)")
    command.add_argument("--batch", type=int, default=64, help="images per actor call (default 64)")
    command.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default 2)")
    command.add_argument("--maps", action="store_true", help="also write the normalised maps [H, W]")
    command.add_argument("--part-rows", type=int, default=4096, help="rows per Parquet part, at least (default 4096)")
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.set_defaults(handler=_score_command)
