"""The ``gradprobe`` command line: train, train-gradcon, export, info, explain, calibrate, train-contrastive, demo;
bench and eval from a checkout."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from .base.errors import GradprobeError, InputError


def _train(args):
    from gradprobe.export.train import train

    result = train(args.arch, epochs=args.epochs, seed=args.seed, out=args.out, lr=args.lr,
                   batch_size=args.batch_size, threads=args.threads, limit=args.limit)
    print(json.dumps(result, indent=2))


def _train_gradcon(args):
    from gradprobe.export.gradcon import train_normal_class

    record = train_normal_class(args.normal_class, args.out, epochs=args.epochs, seed=args.seed, quick=args.quick,
                                threads=args.threads)
    record = {key: value for key, value in record.items() if key != "history"}
    if args.bundle:
        record["bundle"] = str(_gradcon_bundle(args.out, args.bundle, args.outlier_percent, args.threads))
    print(json.dumps(record, indent=2))


def _gradcon_bundle(checkpoint, bundle, outlier_percent: int, threads):
    """Export the trained model and calibrate its threshold on the GPND validation fold (max F1)."""
    import gradprobe
    from gradprobe.data import fashion_mnist_pooled, gpnd_folds, gpnd_split
    from gradprobe.export.gradcon import load_gradcon

    model, metadata = load_gradcon(checkpoint)
    training = metadata.get("training", {})
    images, labels = fashion_mnist_pooled()
    split = gpnd_split(labels, gpnd_folds(labels, training.get("split_seed", 0)), training["normal_class"],
                       outlier_percent)
    val, is_outlier = images[split["val"]], split["val_outlier"]
    path = gradprobe.export(model, val[:8], bundle, training=training)
    with gradprobe.load(path, threads=threads) as probe:
        probe.calibrate(val[~is_outlier], val[is_outlier], description={
            "normal": f"Fashion-MNIST class {training['normal_class']}, GPND validation fold",
            "anomalous": f"the other classes of the same fold, {outlier_percent} % of the set"})
    return path


def _export(args):
    import numpy as np

    import gradprobe
    from gradprobe.models import PRESETS, load_checkpoint, load_pretrained

    if args.model in PRESETS:
        raise GradprobeError(f"{args.model!r} is an untrained preset; train it first: "
                             f"gradprobe train --arch {args.model} --out model.safetensors")
    model = load_checkpoint(args.model) if args.model.endswith(".safetensors") else load_pretrained(args.model)
    shape = [int(v) for v in args.input_shape.split(",")]
    example = np.random.default_rng(0).random((4, *shape), dtype=np.float32)
    class_names = args.class_names.split(",") if args.class_names else None
    path = gradprobe.export(model, example, args.out, target_layer=args.target_layer, class_names=class_names,
                            layer_grads=args.layer_grads, confounding=args.confounding,
                            contrastive=args.contrastive or None)
    _print_info(path)


def _print_gradcon_info(probe):
    manifest, section = probe.manifest, probe.manifest.gradcon
    print(probe)
    print(f"model      {manifest.model.class_name} ({manifest.model.parameters:,} parameters), GradCon anomaly "
          f"detector{'' if 'normal_class' not in section.training else ' of class ' + str(section.training['normal_class'])}")
    print(f"input      images [B, {', '.join(map(str, manifest.input.shape))}] float32 in {list(manifest.input.range)}")
    print("outputs")
    for spec in manifest.outputs:
        print(f"  {spec.name:<24} {spec.meaning}")
    errors = manifest.export.get("max_abs_error_vs_autograd") or {}
    if errors:
        print(f"export     max |ORT - per-sample autograd| = {max(errors.values()):.1e}; "
              f"TensorRT parser problems: {manifest.export.get('tensorrt_problems') or 'none'}")
    if section.threshold is not None:
        print(f"threshold  {section.threshold:.6g} ({section.calibration.get('rule')})")
    print("scores     higher means more anomalous (score = -normality)")


def _print_info(path):
    import gradprobe

    probe = gradprobe.load(path)
    if probe.manifest.kind == "gradcon":
        return _print_gradcon_info(probe)
    manifest, section = probe.manifest, probe.manifest.classifier
    print(probe)
    print(f"model      {manifest.model.class_name} ({manifest.model.parameters:,} parameters)")
    if manifest.graph_weights:
        weights = manifest.graph_weights
        print(f"weights    beside the graph in {weights.file}: {len(weights.tensors)} tensors, "
              f"{manifest.files[weights.file].bytes / 2 ** 30:.2f} GiB")
    print(f"input      images [B, {', '.join(map(str, manifest.input.shape))}] float32 in {list(manifest.input.range)}, "
          f"normalised in the graph with mean {list(manifest.input.mean)}, std {list(manifest.input.std)}")
    print(f"classes    {', '.join(section.class_names)}")
    print(f"target     {section.target_layer} {list(section.target_shape)}; "
          f"last Linear {section.linear!r} ({section.features} features)")
    print("outputs")
    for spec in manifest.outputs:
        print(f"  {spec.name:<24} {spec.meaning}")
    verified = manifest.export.get("verified_against_torch")
    if verified:
        print(f"export     max |ORT - torch| / max|torch| = {max(verified.values()):.1e}; "
              f"TensorRT parser problems: {manifest.export.get('tensorrt_problems') or 'none'}")
    if section.layer_grads:
        forms = section.layer_grads.forms
        print(f"layer grads {len(forms)} parameter tensors, {section.layer_grads.confounding} confounding "
              f"loss; closed form {forms.count('closed')}, Gram in graph {forms.count('gram')}, "
              f"direct in kernels {forms.count('tap')}, generic {forms.count('generic')}")
    for head in manifest.heads:
        accuracy = head.fit.get("held_out_accuracy")
        print(f"head       {head.name}: {', '.join(head.input_names)} -> {', '.join(head.output_names)}"
              + (f" (held-out accuracy {accuracy:.4f})" if isinstance(accuracy, float) else ""))
    if manifest.detector:
        print(f"detector   {manifest.detector.kind}, threshold {manifest.detector.threshold:.4g} "
              f"at TPR {manifest.detector.tpr}, features {manifest.detector.features}")
    print("scores     higher means more anomalous")


def _info(args):
    _print_info(args.bundle)


def _demo(args):
    from gradprobe.demo import run_demo

    run_demo(args.out, threads=args.threads)


def _calibrate(args):
    import gradprobe
    from gradprobe.data import OOD_SETS, fmnist_part, ood_set

    probe = gradprobe.load(args.bundle)
    in_dist = fmnist_part("fit", args.n_in)[0]
    ood = None if args.kind == "ood-free" else ood_set(args.ood, "fit", args.n_ood)
    description = {"in_dist": f"Fashion-MNIST test split, part 'fit' ({len(in_dist)} images)",
                   "ood": None if ood is None else f"{args.ood}: {OOD_SETS[args.ood]}, part 'fit' ({len(ood)} images)"}
    section = probe.calibrate(in_dist, ood, kind=args.kind, tpr=args.tpr, seed=args.seed, description=description)
    print(json.dumps(section.to_json(), indent=2))


def _train_contrastive(args):
    import gradprobe

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    probe = gradprobe.load(args.bundle, threads=args.threads)
    images, labels = gradprobe.data.fashion_mnist("train")
    images, labels = images[:args.limit], labels[:args.limit]
    description = f"Fashion-MNIST train, clean ({len(images)} images; {args.held_out:.0%} held out for early stopping)"
    spec = probe.train_contrastive(images, labels, variant=args.variant, seed=args.seed, max_epochs=args.epochs,
                                   patience=args.patience, held_out=args.held_out, description=description)
    print(json.dumps(spec.to_json(), indent=2))


#: Commands that run the benchmark harness of a source checkout (``benchmarks/``, not installed).
HARNESS_COMMANDS = {"bench": "latency of the probe graph vs plain forward, the eager reference and GradCAM",
                    "eval": "detection and explanation evaluations beside the peer libraries"}


def source_checkout() -> Path:
    """The gradprobe source checkout holding ``benchmarks/``: $GRADPROBE_SOURCE, else the current folder."""
    root = Path(os.environ.get("GRADPROBE_SOURCE", "."))
    if not (root / "benchmarks" / "cli.py").is_file():
        raise GradprobeError(f"this command runs the benchmark harness of a gradprobe source checkout, which an "
                             f"installed wheel does not ship; no benchmarks/cli.py under {root.resolve()}. Run it "
                             "from the root of a gradprobe clone, or set GRADPROBE_SOURCE to one")
    return root.resolve()


def _harness(args):
    root = str(source_checkout())
    if root not in sys.path:
        sys.path.insert(0, root)
    code = importlib.import_module("benchmarks.cli").main([args.command, *args.arguments])
    if code:
        raise GradprobeError(f"{args.command} failed (exit {code})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradprobe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a reference model on Fashion-MNIST")
    train.add_argument("--arch", default="resnet18-quarter", help="model preset (see gradprobe.models.PRESETS)")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--lr", type=float, default=0.05)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    train.add_argument("--out", required=True, help="safetensors checkpoint to write")
    train.set_defaults(handler=_train)

    gradcon = commands.add_parser("train-gradcon", help="train a GradCon anomaly detector for one Fashion-MNIST "
                                                         "class (GPND folds)")
    gradcon.add_argument("--normal-class", type=int, required=True, choices=range(10), metavar="K",
                         help="the normal class 0-9; every other class is an anomaly")
    gradcon.add_argument("--epochs", type=int, default=20)
    gradcon.add_argument("--seed", type=int, default=0)
    gradcon.add_argument("--quick", action="store_true", help="a few dozen steps on a subset (smoke runs, CI)")
    gradcon.add_argument("--threads", type=int, default=None)
    gradcon.add_argument("--out", required=True, help="safetensors checkpoint to write (weights + references)")
    gradcon.add_argument("--bundle", default=None, help="also export a bundle here, threshold calibrated on the "
                                                        "validation fold")
    gradcon.add_argument("--outlier-percent", type=int, default=50,
                         help="anomalies in the calibration set, in %% (default 50)")
    gradcon.set_defaults(handler=_train_gradcon)

    export = commands.add_parser("export", help="export a checkpoint with its probe graph as a bundle")
    export.add_argument("model", help="'resnet-fmnist' (shipped) or a .safetensors file from `gradprobe train`")
    export.add_argument("--out", required=True, help="bundle directory to write")
    export.add_argument("--target-layer", default=None, help="module name (default: last conv stage)")
    export.add_argument("--class-names", default=None, help="comma-separated, one per class")
    export.add_argument("--input-shape", default="1,28,28", help="C,H,W of one image (default 1,28,28)")
    export.add_argument("--layer-grads", action="store_true",
                        help="also output layer_grad_sqnorm: every parameter tensor's per-sample gradient norm")
    export.add_argument("--confounding", choices=("bce", "softmax"), default="bce",
                        help="loss of the all-ones confounding label for --layer-grads (default bce)")
    export.add_argument("--contrastive", nargs="+", choices=("full", "compact", "norms"), default=None,
                        help="also output the contrastive features r_x of these variants (for train-contrastive)")
    export.set_defaults(handler=_export)

    info = commands.add_parser("info", help="describe a bundle")
    info.add_argument("bundle")
    info.set_defaults(handler=_info)

    from gradprobe.data import OOD_SETS
    from gradprobe.detect import DETECTORS
    from gradprobe.explain import add_explain_command
    from gradprobe.export.tensorrt_build import add_build_command

    add_explain_command(commands)
    add_build_command(commands)

    calibrate = commands.add_parser("calibrate", help="fit an OOD detector and store it in the bundle")
    calibrate.add_argument("bundle")
    calibrate.add_argument("--kind", default="paper", choices=sorted(DETECTORS))
    calibrate.add_argument("--ood", default="digits", choices=sorted(OOD_SETS), help="OOD set for supervised kinds")
    calibrate.add_argument("--n-in", type=int, default=2000,
                           help="Fashion-MNIST fit images (half train, half threshold)")
    calibrate.add_argument("--n-ood", type=int, default=300)
    calibrate.add_argument("--tpr", type=float, default=0.95, help="in-distribution acceptance rate of the threshold")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(handler=_calibrate)

    from gradprobe.serve.triton import add_serve_command

    add_serve_command(commands)

    from gradprobe.serve.scale import add_score_command

    add_score_command(commands)

    contrastive = commands.add_parser(
        "train-contrastive", help="train the contrastive second stage (MLP on r_x of clean Fashion-MNIST train) "
        "into a bundle exported with --contrastive")
    contrastive.add_argument("bundle")
    contrastive.add_argument("--variant", default=None, choices=("full", "compact", "norms"),
                             help="r_x variant to train on (default: the bundle's first)")
    contrastive.add_argument("--seed", type=int, default=0)
    contrastive.add_argument("--epochs", type=int, default=30, help="at most this many epochs")
    contrastive.add_argument("--patience", type=int, default=4,
                             help="stop after this many epochs without a better held-out accuracy")
    contrastive.add_argument("--held-out", type=float, default=0.1,
                             help="fraction of the images kept for early stopping")
    contrastive.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    contrastive.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads")
    contrastive.set_defaults(handler=_train_contrastive)

    demo = commands.add_parser("demo", help="export, run and explain the shipped model on real data")
    demo.add_argument("--out", default="gradprobe-demo", help="folder for the bundle and pictures")
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(handler=_demo)

    for name, text in HARNESS_COMMANDS.items():
        # prefix_chars NUL (never in argv): no argument is an option here, so all of them, -h and leading
        # options included, reach the harness's own parser instead of failing as unrecognized
        harness = commands.add_parser(name, help=f"{text} (source checkout only; `gradprobe {name} -h` for options)",
                                      add_help=False, prefix_chars="\0")
        harness.add_argument("arguments", nargs=argparse.REMAINDER)
        harness.set_defaults(handler=_harness)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except GradprobeError as error:
        print(f"gradprobe {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
