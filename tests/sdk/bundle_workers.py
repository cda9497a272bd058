"""Processes that write or read one bundle concurrently, for the lock and kill tests (test_bundle_writers.py).

``python -m tests.sdk.bundle_workers MODE BUNDLE [options]``; each prints ``ready`` once set up (imports
done, probe loaded) and, when it ends on its own, one JSON line of counts. Modes:

- ``calibrate``: calibrate BUNDLE ``--rounds`` times (0: until killed), a different seed each round, so each
  round writes a new detector file and retires the previous one.
- ``read``: load BUNDLE and detect until the file ``--stop`` exists; counts successes and errors by type.
- ``update``: the write half of ``calibrate`` in a loop until killed: two detectors fitted once, stored in
  turn (so a kill lands in the update far more often than in a full calibration).
- ``export``: rewrite BUNDLE whole until killed, alternating the contents of the bundles in ``--sources``
  (what ``gradprobe.export`` does in its last step); ``--no-exchange`` takes the two-rename swap.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np


def images(seed: int, count: int = 12) -> np.ndarray:
    """Smooth images in [0, 1]: the detector's fit differs with the seed, so does its file name."""
    rng = np.random.default_rng(seed)
    base = rng.random((count, 1, 7, 7)).astype(np.float32)
    return np.repeat(np.repeat(base, 4, axis=2), 4, axis=3)


def calibrate(bundle: Path, rounds: int, seed: int) -> dict:
    import gradprobe

    probe = gradprobe.load(bundle)
    counts = collections.Counter()
    print("ready", flush=True)
    round_ = 0
    while rounds == 0 or round_ < rounds:
        try:
            probe.calibrate(images(seed * 1000 + round_), kind="ood-free", seed=seed * 1000 + round_)
            counts["calibrated"] += 1
        except Exception as error:  # counted, and the test asserts there are none
            counts[f"{type(error).__name__}: {str(error)[:200]}"] += 1
        round_ += 1
    return dict(counts)


def update(bundle: Path, seed: int) -> dict:
    import dataclasses

    import gradprobe
    from gradprobe.base.bundle import update_bundle
    from gradprobe.detect import fit_detector

    probe = gradprobe.load(bundle)
    fitted = [fit_detector(probe, images(seed * 1000 + k), kind="ood-free", seed=k) for k in range(2)]
    print("ready", flush=True)
    count = 0
    while True:
        section, _, data = fitted[count % 2]
        update_bundle(bundle, lambda manifest: dataclasses.replace(manifest, detector=section), {section.file: data})
        count += 1


def read(bundle: Path, stop: Path) -> dict:
    import gradprobe

    counts = collections.Counter()
    batch = images(7, 4)
    print("ready", flush=True)
    while not stop.exists():
        try:
            gradprobe.load(bundle).detect(batch)
            counts["success"] += 1
        except gradprobe.BundleError:
            counts["BundleError"] += 1
        except Exception as error:
            counts[f"{type(error).__name__}: {str(error)[:200]}"] += 1
    return dict(counts)


def export(bundle: Path, sources: list[Path], exchange: bool) -> dict:
    from gradprobe.base import fileio
    from gradprobe.base.bundle import Bundle, write_bundle

    if not exchange:
        fileio._exchange = lambda first, second: False  # the systems without renameat2
    contents = []
    for source in sources:
        opened = Bundle.open(source)
        contents.append((opened.manifest, {name: opened.read(name) for name in opened.manifest.files}))
    print("ready", flush=True)
    count = 0
    while True:
        manifest, files = contents[count % len(contents)]
        write_bundle(bundle, manifest, files)
        count += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["calibrate", "update", "read", "export"])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=Path)
    parser.add_argument("--sources", type=Path, nargs="*", default=[])
    parser.add_argument("--no-exchange", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.mode == "calibrate":
        counts = calibrate(args.bundle, args.rounds, args.seed)
    elif args.mode == "update":
        counts = update(args.bundle, args.seed)
    elif args.mode == "read":
        counts = read(args.bundle, args.stop)
    else:
        counts = export(args.bundle, args.sources, not args.no_exchange)
    print(json.dumps({"counts": counts, "seconds": round(time.monotonic() - started, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
