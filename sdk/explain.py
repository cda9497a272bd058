"""``Probe.explain``: Grad-CAM, contrastive and counterfactual maps at the input size (METHODS.md §3).

The probe graph already emits the three raw maps at the target layer, and takes one contrast class Q per
row. Several Q per image are answered with ONE engine call on the batch tiled K times (one contrast
column per tile), then split. Maps are upsampled bilinearly (half-pixel centres, as cv2.resize) and
min-max normalised per map, the convention of pytorch-grad-cam, so they compare one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .viz import normalize_maps, upsample

MAPS = ("cam", "contrastive_cam", "counterfactual_cam")


@dataclass(frozen=True)
class Explanation:
    """Maps in [0, 1] at the input size H x W; K = number of contrast classes when several were asked."""

    cam: np.ndarray                 #: [B, H, W] "why P?"
    contrastive_cam: np.ndarray     #: [B, H, W], or [B, K, H, W] with several Q per image: "why P, rather than Q?"
    counterfactual_cam: np.ndarray  #: [B, H, W] "what if not P?"
    pred: np.ndarray                #: [B] int64, P
    contrast: np.ndarray            #: [B] or [B, K] int64, Q (runner-up resolved)
    probs: np.ndarray               #: [B, C] softmax
    class_names: list = field(default_factory=list, repr=False)
    empty: dict = field(default_factory=dict, repr=False)  #: map name -> bool mask: raw map all zero (no evidence)

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def several(self) -> bool:
        """True when ``contrastive_cam`` has the K axis."""
        return self.contrast.ndim == 2

    @property
    def pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.pred]

    def contrast_columns(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(Q [B], contrastive map [B, H, W]), ...], one per contrast class: the same view with or without K."""
        if not self.several:
            return [(self.contrast, self.contrastive_cam)]
        return [(self.contrast[:, k], self.contrastive_cam[:, k]) for k in range(self.contrast.shape[1])]


def _class_index(value, class_names) -> int:
    if isinstance(value, str):
        if value not in class_names:
            raise InputError(f"unknown class name {value!r}; expected one of {list(class_names)}")
        return list(class_names).index(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"contrast classes must be class indices or names, got {value!r} ({type(value).__name__})")
    return int(value)


def contrast_matrix(contrast, batch: int, class_names) -> tuple[np.ndarray, bool]:
    """``contrast`` as int64 [B, K] (-1 = runner-up) and whether the caller asked for several per image.

    None, one class for all, one per image ([B]) -> K = 1; a list of lists or a 2-D array [B, K] -> several.
    """
    from gradprobe.runtime import validate_contrast

    if isinstance(contrast, np.ndarray) and contrast.ndim == 2 or (
            isinstance(contrast, (list, tuple)) and contrast
            and all(isinstance(row, (list, tuple, np.ndarray)) for row in contrast)):
        rows = [[_class_index(v, class_names) for v in (row.tolist() if isinstance(row, np.ndarray) else row)]
                for row in contrast]
        if len(rows) != batch or len({len(row) for row in rows}) != 1 or not rows[0]:
            raise InputError(f"several contrast classes per image must be {batch} rows of the same length K >= 1 "
                             f"(one row per image), got row lengths {[len(r) for r in rows]}")
        matrix = np.array(rows, dtype=np.int64)
        for column in matrix.T:
            validate_contrast(column, batch, class_names)  # range check, same message as Probe.run
        return matrix, True
    if isinstance(contrast, (list, tuple)):
        if len(contrast) != batch and batch == 1:
            raise InputError(f"contrast has {len(contrast)} classes for 1 image; for several contrast classes per "
                             f"image pass one list per image, e.g. [{list(contrast)!r}]")
        contrast = np.array([_class_index(v, class_names) for v in contrast], dtype=np.int64)  # names and indices
    return validate_contrast(contrast, batch, class_names)[:, None], False


def explain(probe, images, contrast=None) -> Explanation:
    """The three maps for ``images`` float32 [B, C, H, W] in [0, 1], from one engine call.

    ``contrast``: None (runner-up), one class index or name for all, one per image, or several per image
    (list of lists / int array [B, K]; then ``contrastive_cam`` is [B, K, H, W]).
    """
    from gradprobe.runtime import validate_images

    images = validate_images(images, probe.input_shape)
    batch, size = len(images), images.shape[2:]
    matrix, several = contrast_matrix(contrast, batch, probe.class_names)
    tiles = matrix.shape[1]
    # tile k holds every image with contrast column k: rows k*B .. (k+1)*B - 1
    result = probe.run(np.tile(images, (tiles, 1, 1, 1)) if tiles > 1 else images, matrix.T.reshape(-1))

    def finish(raw):  # [N, u, v] -> [N, H, W] in [0, 1]
        return normalize_maps(upsample(raw, size))

    raw_contrastive = result.contrastive_cam.reshape(tiles, batch, *result.contrastive_cam.shape[1:])
    contrastive = finish(raw_contrastive.reshape(-1, *raw_contrastive.shape[2:])).reshape(tiles, batch, *size)
    contrast_class = result.contrast_class.reshape(tiles, batch).T
    empty = {"cam": ~result.cam[:batch].reshape(batch, -1).any(axis=1),
             "counterfactual_cam": ~result.counterfactual_cam[:batch].reshape(batch, -1).any(axis=1),
             "contrastive_cam": ~raw_contrastive.reshape(tiles, batch, -1).any(axis=2).T}
    if not several:
        contrast_class, empty["contrastive_cam"] = contrast_class[:, 0], empty["contrastive_cam"][:, 0]
    return Explanation(cam=finish(result.cam[:batch]),
                       contrastive_cam=contrastive.transpose(1, 0, 2, 3) if several else contrastive[0],
                       counterfactual_cam=finish(result.counterfactual_cam[:batch]),
                       pred=result.pred[:batch], contrast=contrast_class, probs=result.probs[:batch],
                       class_names=list(probe.class_names), empty=empty)


# ------------------------------------------------------------------------------------------ command line
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_input(path, input_shape) -> np.ndarray:
    """One image file (resized to the bundle's H x W with Pillow, converted to its channel count, scaled to
    [0, 1]) or one .npy batch (float32 in [0, 1] or uint8; [N, C, H, W] or one image [C, H, W]) -> [N, C, H, W]."""
    channels, height, width = input_shape
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        batch = np.load(path, allow_pickle=False)
        if batch.dtype == np.uint8:
            batch = batch.astype(np.float32) / 255
        if batch.dtype != np.float32:
            raise InputError(f"{path}: .npy batches must hold float32 in [0, 1] or uint8 pixels, got {batch.dtype}")
        return batch[None] if batch.ndim == 3 else batch
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: expected a .png, .jpg/.jpeg image or a .npy batch [N, C, H, W]")
    try:
        from PIL import Image
    except ImportError as error:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("reading image files needs Pillow: pip install 'gradprobe[viz]'") from error
    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255
    return (pixels[None] if channels == 1 else pixels.transpose(2, 0, 1))[None]


def _parse_class(text: str):
    return int(text) if text.lstrip("-").isdigit() else text


def _explain_command(args) -> None:
    import gradprobe

    from .viz import explanation_figure

    if args.rows < 1:
        raise InputError(f"--rows must be a positive integer, got {args.rows}")
    probe = gradprobe.load(args.bundle)
    classes = [_parse_class(c) for c in args.contrast or []]
    for source in map(Path, args.inputs):
        images = read_input(source, probe.input_shape)
        for start in range(0, len(images), args.rows):
            part = images[start:start + args.rows]
            # one Q for all: a scalar; several: the same K classes for every image
            contrast = None if not classes else classes[0] if len(classes) == 1 else [classes] * len(part)
            explanation = explain(probe, part, contrast)
            name = source.stem if len(images) <= args.rows else f"{source.stem}-{start:05d}"
            labels = [source.name] if source.suffix.lower() != ".npy" else \
                [f"{source.name}[{start + i}]" for i in range(len(part))]
            print(f"wrote {explanation_figure(part, explanation, Path(args.out) / f'{name}.png', row_names=labels)}")


def add_explain_command(subparsers) -> None:
    """Register ``gradprobe explain IMAGE_OR_NPY... --bundle B [--contrast Q ...] --out DIR``."""
    command = subparsers.add_parser(
        "explain", help="write Grad-CAM, contrastive and counterfactual maps as PNG grids",
        description="One PNG per input file (a .npy batch: one per --rows images); one row per image: the input, "
                    "'why P?', 'why P, rather than Q?' for each Q, 'what if not P?'.")
    command.add_argument("inputs", nargs="+", metavar="IMAGE_OR_NPY",
                         help="PNG/JPEG files (resized to the bundle's input size) or .npy float32 [N,C,H,W] in [0,1]")
    command.add_argument("--bundle", required=True, help="bundle directory from `gradprobe export`")
    command.add_argument("--contrast", nargs="+", default=None, metavar="CLASS_NAME_OR_INDEX",
                         help="contrast class(es) Q for every image (default: the runner-up)")
    command.add_argument("--out", required=True, help="folder for the PNGs")
    command.add_argument("--rows", type=int, default=16, help="images per PNG for .npy batches (default 16)")
    command.set_defaults(handler=_explain_command)
