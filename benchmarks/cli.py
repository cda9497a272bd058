"""``gradprobe bench`` and ``gradprobe eval``: the harness commands of a source checkout.

The installed ``gradprobe`` command forwards these two commands here (``main(["bench", ...])``) when run
from a checkout (or with ``$GRADPROBE_SOURCE`` set); ``python -m benchmarks.cli bench|eval ...`` works too.
An evaluation is a module listed in ``EVALUATION_MODULES`` whose ``EVALUATIONS`` maps each name to
``(help, add_arguments(parser), run(args) -> exit code)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gradprobe.base.errors import GradprobeError

EVALUATION_MODULES = ("benchmarks.detection", "benchmarks.explain_faithfulness", "benchmarks.explain_speed",
                      "benchmarks.layer_grads_bench", "benchmarks.parity_table", "benchmarks.contrastive",
                      "benchmarks.gradcon_protocol", "benchmarks.gradcon_speed")


def evaluations() -> dict:
    """name -> (help, add_arguments, run), from every module in ``EVALUATION_MODULES``."""
    found = {}
    for module in EVALUATION_MODULES:
        found.update(importlib.import_module(module).EVALUATIONS)
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import latency

    parser = argparse.ArgumentParser(prog="gradprobe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="latency of the probe graph vs plain forward, the eager reference "
                                "and GradCAM", description=latency.__doc__.split("\n\n")[0])
    latency.add_arguments(bench)
    bench.set_defaults(handler=latency.run)
    evaluate = commands.add_parser("eval", help="detection and explanation evaluations beside the peer libraries",
                                   description="Evaluations and side benchmarks; each writes its table (.md) "
                                               "and data (.json) under benchmarks/results unless told otherwise.")
    which = evaluate.add_subparsers(dest="evaluation", required=True, metavar="EVALUATION")
    for name, (text, add_arguments, run) in evaluations().items():
        sub = which.add_parser(name, help=text, description=text)
        add_arguments(sub)
        sub.set_defaults(handler=run)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "eval":  # the evaluation's own arguments, which its result files quote to reproduce it
        args.argv = argv[argv.index(args.evaluation) + 1:]
    try:
        return int(args.handler(args) or 0)
    except GradprobeError as error:
        print(f"gradprobe {args.command}: error: {error}", file=sys.stderr)
        return 2


def evaluation_main(name: str, argv=None) -> int:
    """``python -m benchmarks.<module> ARGS``: the same as ``gradprobe eval NAME ARGS``."""
    return main(["eval", name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
