"""The ``gradprobe`` command line: train, export, info, bench, demo."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import GradprobeError


def _train(args):
    from gradprobe.export.train import train

    result = train(args.arch, epochs=args.epochs, seed=args.seed, out=args.out, lr=args.lr,
                   batch_size=args.batch_size, threads=args.threads, limit=args.limit)
    print(json.dumps(result, indent=2))


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
                            layer_grads=args.layer_grads, confounding=args.confounding)
    _print_info(path)


def _print_info(path):
    import gradprobe

    probe = gradprobe.load(path)
    manifest = probe.manifest
    print(probe)
    print(f"model      {manifest['model']['class']} ({manifest['model']['parameters']:,} parameters)")
    print(f"input      images {manifest['input']['shape']} float32 in [0, 1], "
          f"normalised in the graph with {manifest['input']['normalize']}")
    print(f"classes    {', '.join(manifest['class_names'])}")
    print(f"target     {manifest['target_layer']['name']} {manifest['target_layer']['shape']}; "
          f"last Linear {manifest['head']['linear']!r} ({manifest['head']['features']} features)")
    print("outputs")
    for name, meaning in manifest["outputs"].items():
        print(f"  {name:<24} {meaning}")
    verified = manifest["export"]["verified_against_torch"]
    if verified:
        print(f"export     max |ORT - torch| / max|torch| = {max(verified.values()):.1e}; "
              f"TensorRT parser problems: {manifest['export']['tensorrt_problems'] or 'none'}")
    if manifest.get("layer_grads"):
        forms = manifest["layer_grads"]["forms"]
        print(f"layer grads {len(forms)} parameter tensors, {manifest['layer_grads']['confounding']} confounding "
              f"loss; closed form {forms.count('closed')}, Gram in graph {forms.count('gram')}, "
              f"direct in kernels {forms.count('tap')}")
    print(f"scores     {manifest['score_orientation']}")


def _info(args):
    _print_info(args.bundle)


def _demo(args):
    from gradprobe.demo import run_demo

    run_demo(args.out, bench=not args.no_bench, threads=args.threads)


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
    export.set_defaults(handler=_export)

    info = commands.add_parser("info", help="describe a bundle")
    info.add_argument("bundle")
    info.set_defaults(handler=_info)

    from gradprobe.bench import add_bench_command

    add_bench_command(commands)

    from gradprobe.explain import add_explain_command

    add_explain_command(commands)

    from gradprobe.evaluate import add_detect_commands

    add_detect_commands(commands)

    from gradprobe.serve.triton import add_serve_command

    add_serve_command(commands)

    from gradprobe.serve.scale import add_score_command

    add_score_command(commands)

    demo = commands.add_parser("demo", help="export, run, explain and time the shipped model")
    demo.add_argument("--out", default="gradprobe-demo", help="folder for the bundle and pictures")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--no-bench", action="store_true", help="skip the latency table")
    demo.set_defaults(handler=_demo)
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
