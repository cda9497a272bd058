"""Ray Data scoring throughput with 1 vs 2 Probe actors on a local Ray instance (2 CPUs), beside
in-process ``Probe.run``; writes benchmarks/results/score.{md,json}.

Runs alternate (1, 2, 1, 2 actors, ...) on one Ray instance so both see the same machine load; each
run scores the same .npy files into a fresh folder and is timed end to end (actor start-up included,
Ray start-up excluded). Run in the serving venv: `make bench-serve`.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import gradprobe

from .harness import timing
from gradprobe.serve.scale import score

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "score"))
    args = parser.parse_args(argv)
    import ray

    work = Path(tempfile.mkdtemp(prefix="gradprobe-score-"))
    images, _ = gradprobe.data.fashion_mnist("test")
    images = images[:args.images]
    bundle = work / "bundle"
    gradprobe.export(gradprobe.models.load_pretrained("resnet-fmnist"), images[:4], bundle)
    (work / "in").mkdir()
    for i, part in enumerate(np.array_split(images, args.files)):
        np.save(work / "in" / f"part{i:03d}.npy", part)

    probe = gradprobe.load(bundle, threads=1, spinning=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs = []
    try:
        for round_ in range(args.rounds):
            began = time.perf_counter()
            for start in range(0, len(images), args.batch):
                probe.run(images[start:start + args.batch])
            local = len(images) / (time.perf_counter() - began)
            runs.append({"round": round_, "what": "in-process Probe.run, 1 thread", "images_per_s": local,
                         "loadavg": os.getloadavg()[0]})
            for actors in (1, 2):
                summary = score(bundle, work / "in", work / f"out-{round_}-{actors}", actors=actors,
                                batch=args.batch, progress=False)
                steady = len(images) / (summary["seconds"] - summary["first_output_s"])
                runs.append({"round": round_, "what": f"Ray Data, {actors} actor(s)", "actors": actors,
                             "images_per_s": summary["images_per_s"], "seconds": summary["seconds"],
                             "startup_s": summary["first_output_s"], "steady_images_per_s": steady,
                             "loadavg": os.getloadavg()[0]})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        ray.shutdown()
    whats = list(dict.fromkeys(r["what"] for r in runs))

    def mean(key, what):
        values = [r[key] for r in runs if r["what"] == what and key in r]
        return float(np.mean(values)) if values else None

    summary = {what: {key: mean(key, what) for key in ("images_per_s", "startup_s", "steady_images_per_s")}
               for what in whats}
    one, two = summary["Ray Data, 1 actor(s)"], summary["Ray Data, 2 actor(s)"]
    report = {"images": len(images), "files": args.files, "batch": args.batch, "runs": runs, "mean": summary,
              "two_vs_one_actor": two["images_per_s"] / one["images_per_s"],
              "two_vs_one_actor_steady": two["steady_images_per_s"] / one["steady_images_per_s"]}
    out = Path(args.out)
    timing.publish(out.name, markdown(report), report, out.parent)


def markdown(report) -> str:
    runs, summary = report["runs"], report["mean"]
    lines = ["# `gradprobe score`: Ray Data throughput, 1 vs 2 Probe actors (local Ray, 2 CPUs)", "",
             f"Written by `python -m benchmarks.score_throughput`: {report['images']} Fashion-MNIST images in "
             f"{report['files']} .npy files, batch {report['batch']}, each actor one ONNX Runtime thread; end to end "
             "per run (reading, actor start-up, scoring, Parquet), runs alternated on a 2-core machine shared with "
             "other work (load average at the end of each run in the last column). Start-up = time to the first "
             "scored batch (Ray workers, actors loading the bundle, the first read); steady = images / (time after "
             "the first output).", "",
             "| what | end to end img/s | start-up s | steady img/s | end to end, per round | load avg |",
             "|---|---|---|---|---|---|"]

    def cell(value, form):
        return "" if value is None else format(value, form)

    for what, values in summary.items():
        per = ", ".join(f"{r['images_per_s']:.0f}" for r in runs if r["what"] == what)
        load = ", ".join(f"{r['loadavg']:.0f}" for r in runs if r["what"] == what)
        lines.append(f"| {what} | {values['images_per_s']:.0f} | {cell(values['startup_s'], '.1f')} | "
                     f"{cell(values['steady_images_per_s'], '.0f')} | {per} | {load} |")
    lines += ["", f"2 actors / 1 actor: **{report['two_vs_one_actor']:.2f}x** end to end, "
              f"**{report['two_vs_one_actor_steady']:.2f}x** steady", ""]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
