"""``Probe.explain``: every explanation map of the bundle at the input size (docs/METHODS.md §3).

The probe graph emits the raw maps at the target layer (which maps, and what each answers, the bundle's
manifest says: Grad-CAM "why P?", contrastive "why P, rather than Q?", counterfactual "what if not P?",
Grad-CAM++) and takes one contrast class Q per row. Several Q per image are answered with ONE engine
call on the batch tiled K times (one contrast column per tile), then split. Maps are upsampled bilinearly
(half-pixel centres, as cv2.resize) and min-max normalised per map, pytorch-grad-cam's convention, so
they compare one to one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .base.errors import InputError
from .viz import normalize_maps, upsample


@dataclass(frozen=True)
class Explanation:
    """Maps in [0, 1] at the input size H x W, by name (``maps``; also ``explanation.cam`` etc.).

    Maps that depend on the contrast class have a K axis ([B, K, H, W]) when several Q per image were
    asked; the others are [B, H, W].
    """

    maps: dict
    specs: tuple                    #: MapSpec per map, in the bundle's order
    pred: np.ndarray                #: [B] int64, P
    contrast: np.ndarray            #: [B] or [B, K] int64, Q (runner-up resolved)
    probs: np.ndarray               #: [B, C] softmax
    class_names: list = field(default_factory=list, repr=False)
    empty: dict = field(default_factory=dict, repr=False)  #: map name -> bool mask: raw map all zero (no evidence)

    def __getattr__(self, name: str):
        maps = self.__dict__.get("maps", {})
        if name in maps:
            return maps[name]
        raise AttributeError(f"Explanation has no map {name!r}; maps: {list(maps)}")

    def __len__(self) -> int:
        return len(self.pred)

    @property
    def several(self) -> bool:
        """True when the contrast-dependent maps have the K axis."""
        return self.contrast.ndim == 2

    @property
    def pred_names(self) -> list[str]:
        return [self.class_names[i] for i in self.pred]

    def columns(self, name: str) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """[(Q [B] or None, map [B, H, W]), ...]: one per contrast class for maps that use Q, else one."""
        spec = next(s for s in self.specs if s.name == name)
        if not spec.uses_contrast:
            return [(None, self.maps[name])]
        if not self.several:
            return [(self.contrast, self.maps[name])]
        return [(self.contrast[:, k], self.maps[name][:, k]) for k in range(self.contrast.shape[1])]


def explain(probe, images, contrast=None) -> Explanation:
    """Every map for ``images`` float32 [B, C, H, W] in [0, 1], from one engine call.

    ``contrast``: None (runner-up), one class index or name for all, one per image, or several per image
    (list of lists / int array [B, K]; then the contrast-dependent maps are [B, K, H, W]).
    """
    from gradprobe.runtime import contrast_matrix

    images = probe.engine.validate(images)
    batch, size = len(images), images.shape[2:]
    matrix, several = contrast_matrix(contrast, batch, probe.class_names)
    tiles = matrix.shape[1]
    # tile k holds every image with contrast column k: rows k*B .. (k+1)*B - 1
    tiled = np.tile(images, (tiles, 1, 1, 1)) if tiles > 1 else images
    result = probe.run(tiled, matrix.T.reshape(-1))
    specs = probe.manifest.classifier.maps
    maps, empty = {}, {}
    for spec in specs:
        raw = result[spec.name].reshape(tiles, batch, *result[spec.name].shape[1:])
        if not spec.uses_contrast:
            raw = raw[:1]
        finished = normalize_maps(upsample(raw.reshape(-1, *raw.shape[2:]), size)).reshape(len(raw), batch, *size)
        nothing = ~raw.reshape(len(raw), batch, -1).any(axis=2).T          # [B, tiles]
        if spec.uses_contrast and several:
            maps[spec.name], empty[spec.name] = finished.transpose(1, 0, 2, 3), nothing
        else:
            maps[spec.name], empty[spec.name] = finished[0], nothing[:, 0]
    contrast_class = result["contrast_class"].reshape(tiles, batch).T
    return Explanation(maps=maps, specs=tuple(specs), pred=result.pred[:batch],
                       contrast=contrast_class if several else contrast_class[:, 0], probs=result.probs[:batch],
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
        from .base.errors import BackendUnavailableError

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
