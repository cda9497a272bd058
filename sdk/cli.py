"""The ``gradprobe`` command line: train, export, info, bench, demo."""
from __future__ import annotations

import argparse
import json
import sys


def _train(args):
    from gradprobe.export.train import train

    result = train(args.arch, epochs=args.epochs, seed=args.seed, out=args.out, lr=args.lr,
                   batch_size=args.batch_size, threads=args.threads, limit=args.limit)
    print(json.dumps(result, indent=2))


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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
