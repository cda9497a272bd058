"""Contrastive inference (METHODS.md §4) vs feed-forward on clean, corrupted and shifted Fashion-MNIST, and its speed.

Protocol. The shipped ResNet (``resnet-fmnist``) is exported with its contrastive features; one pass of the
bundle's engine over every image set keeps (p, h) and the feed-forward prediction. Second stages, each a
3-layer MLP of the same size (hidden 256, 128; Adam; early stopping on a seeded 10 % of the training set),
are trained on the **clean** Fashion-MNIST training set only:

- ``contrastive (<variant>)``: on r_x of that variant (full / compact / norms), computed from (p, h) with the
  closed form the graph uses (the same function; its parity with autograd is tested);
- ``(p, h) control``: on (p, h) directly. r_x is a fixed function of (p, h), so a gain of r_x over the
  feed-forward prediction that the control shares is the second stage's doing, not the gradients'.

Test sets: the clean test split (10,000), the 8 challenge types x 5 levels (``gradprobe.data.corrupted_fmnist``)
and the label-preserving shifts (``gradprobe.data.shifted_fmnist``: rotation, scale, translation, inversion),
both on the 5,000-image "eval" part of the test split. Accuracy is the mean ± std over seeds of the MLP.
The engine check installs the (compact, seed 0) MLP as the bundle's head and runs ``contrastive_predict`` on
the clean test split: its predictions must be those of the MLP evaluated here.

Speed: ``Probe.contrastive_predict`` on the trained bundle vs ``Probe.run`` on the same model exported without
contrastive features or head, interleaved round-robin in one process, ONNX Runtime with spinning off and a
pinned thread count; batch 1 and 64; medians, p90 and their ratio.

Entry points: ``gradprobe eval contrastive`` (``EVALUATIONS``, through ``benchmarks/cli.py``), or the same
arguments to ``python -m benchmarks.contrastive``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import gradprobe
from gradprobe import data
from gradprobe.base.fileio import atomic_path, atomic_write_text

from .harness import timing

RESULTS = Path(__file__).resolve().parent / "results"
CONTROL = "ph"
LABELS = {"feed_forward": "feed-forward", "compact": "contrastive (compact)", "norms": "contrastive (norms)",
          "full": "contrastive (full)", CONTROL: "(p, h) control"}
#: Speed target: contrastive_predict / run at batch 64.
SPEED_TARGET = 1.2


# ------------------------------------------------------------------------------------------- bundles
def bundle_path(kind: str) -> Path:
    """The shipped model exported once per gradprobe version into the cache: "features" (r_x, compact) or "plain"."""
    path = data.cache_dir() / "bundles" / f"resnet-fmnist-contrastive-{kind}-{gradprobe.__version__}"
    if not (path / "manifest.json").exists():
        model = gradprobe.models.load_pretrained("resnet-fmnist")
        gradprobe.export(model, data.fashion_mnist("test")[0][:4], path,
                         contrastive="compact" if kind == "features" else None)
    return path


# ---------------------------------------------------------------------------------------- image sets
def image_sets(n_eval: int | None = None) -> list[tuple[str, str, int, callable]]:
    """(group, kind, level, load() -> (images, labels)) for every test set, clean first."""
    sets = [("clean", "clean", 0, lambda: data.fashion_mnist("test"))]
    sets += [("corruption", kind, level, lambda k=kind, lv=level: data.corrupted_fmnist(k, lv, "eval", n_eval))
             for kind in data.CORRUPTIONS for level in data.LEVELS]
    sets += [("shift", kind, level, lambda k=kind, lv=level: data.shifted_fmnist(k, lv, "eval", n_eval))
             for kind, levels in data.SHIFTS.items() for level in range(1, len(levels) + 1)]
    return sets


def extract(probe, name: str, load, progress: bool = True, key: str = "") -> dict:
    """(p, h, feed-forward prediction, labels) of one image set through the bundle's engine, cached per graph
    under ``name`` + ``key`` (what else decides the images, such as their number)."""
    from gradprobe.export.contrastive import engine_outputs

    graph = probe.manifest.files[probe.manifest.graph].sha256[:16]
    path = data.cache_dir() / "contrastive" / graph / f"{name.replace('/', '-')}{key}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as cached:
            return dict(cached)
    images, labels = load()
    outputs = engine_outputs(probe, images, ("probs", "features", "pred"), progress=progress, desc=name)
    arrays = {**outputs, "labels": np.asarray(labels, dtype=np.int64)}
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
    return arrays


# ------------------------------------------------------------------------------------------- methods
def make_input(method: str, arrays: dict):
    from gradprobe.export.contrastive import ph_input, rx_input

    if method == CONTROL:
        return ph_input(arrays["probs"], arrays["features"])
    return rx_input(method, arrays["probs"], arrays["features"])


def accuracy_table(args, probe, sets, train) -> tuple[dict, dict]:
    """{method: {set name: [accuracy per seed]}} with feed-forward as a method of one "seed"; and the fit reports."""
    from gradprobe.export.contrastive import fit_mlp, predict_mlp

    key = f"-n{args.n_eval or 'all'}"
    extracted = {name: extract(probe, name, load, args.progress, "" if name == "clean" else key)
                 for name, load in sets.items()}
    accuracies = {"feed_forward": {name: [float((a["pred"] == a["labels"]).mean())] for name, a in extracted.items()}}
    fits, kept = {}, {}
    plan = [(method, seed) for method in [*args.variants, CONTROL]
            for seed in (args.full_seeds if method == "full" else args.seeds)]
    for number, (method, seed) in enumerate(plan, 1):
        started = time.perf_counter()
        mlp, report = fit_mlp(make_input(method, train), train["labels"], 10, seed=seed, max_epochs=args.max_epochs,
                              patience=args.patience, progress=args.progress, desc=f"{LABELS[method]}, seed {seed}")
        row = accuracies.setdefault(method, {})
        for name, arrays in extracted.items():
            predicted = predict_mlp(mlp, make_input(method, arrays), len(arrays["labels"])).argmax(1)
            row.setdefault(name, []).append(float((predicted == arrays["labels"]).mean()))
            if (method, seed, name) == ("compact", args.seeds[0], "clean"):
                kept["predictions"], kept["mlp"] = predicted, mlp
        fits.setdefault(method, []).append({**report.to_json(), "seconds": round(time.perf_counter() - started, 1)})
        print(f"[{number}/{len(plan)}] {LABELS[method]} seed {seed}: held-out {report.held_out_accuracy:.4f} after "
              f"{report.epochs} epochs (best {report.best_epoch}); clean test {row['clean'][-1]:.4f}", flush=True)
    return accuracies, {"fits": fits, **kept}


def engine_check(probe_path: Path, kept: dict, workdir: Path) -> dict:
    """Install the (compact, first seed) MLP as the bundle's head; ``contrastive_predict`` must reproduce it."""
    from gradprobe.export.contrastive import make_head

    copy = workdir / "trained"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(probe_path, copy)
    probe = gradprobe.load(copy)
    spec, graph = make_head(probe, kept["mlp"], "compact", {"data": "Fashion-MNIST train, clean (engine check)"})
    probe.install_head(spec, graph)
    images, labels = data.fashion_mnist("test")
    result = probe.contrastive_predict(images)
    return {"bundle": str(copy), "agreement_with_torch_mlp": float((result.contrastive_pred == kept["predictions"]).mean()),
            "contrastive_accuracy": float((result.contrastive_pred == labels).mean()),
            "feed_forward_accuracy": float((result.pred == labels).mean())}


# ------------------------------------------------------------------------------------------ summaries
def _mean_std(values) -> tuple[float, float]:
    values = 100 * np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _group_values(accuracies: dict, method: str, names: list[str]) -> list[float]:
    """Per seed, the mean accuracy over ``names`` (so the std is over seeds, not over sets)."""
    table = np.array([accuracies[method][name] for name in names])  # [sets, seeds]
    return list(table.mean(axis=0))


def _difference(first: tuple, second: tuple) -> tuple[float, float]:
    """Difference of two seed means; the spread combines both seed stds (independent MLPs)."""
    return first[0] - second[0], float(np.hypot(first[1], second[1]))


def summarize(accuracies: dict, sets: dict) -> dict:
    """Per group of sets: each method's (mean, std) over seeds of its mean accuracy over the group's sets, and the
    gains of every second stage over feed-forward and of every r_x variant over the (p, h) control."""
    groups = {"clean test": ["clean"],
              "corrupted (8 types x 5 levels)": [n for n in sets if n.startswith("corruption/")],
              "shifted (4 types, 10 sets)": [n for n in sets if n.startswith("shift/")],
              "all challenge sets (50)": [n for n in sets if n != "clean"]}
    summary = {}
    for group, names in groups.items():
        row = {method: _mean_std(_group_values(accuracies, method, names)) for method in accuracies}
        for method in [m for m in accuracies if m != "feed_forward"]:
            row[f"{method} - feed_forward"] = _difference(row[method], row["feed_forward"])
        for method in [m for m in accuracies if m not in ("feed_forward", CONTROL)]:
            if CONTROL in accuracies:
                row[f"{method} - {CONTROL}"] = _difference(row[method], row[CONTROL])
        summary[group] = row
    return summary


def per_kind(accuracies: dict, sets: dict) -> dict:
    """{group/kind: {method: (mean, std)}} averaged over levels, per seed."""
    kinds = {}
    for name in sets:
        if name != "clean":
            kinds.setdefault(name.rsplit("/", 1)[0], []).append(name)
    return {kind: {method: _mean_std(_group_values(accuracies, method, names)) for method in accuracies}
            for kind, names in kinds.items()}


def _cell(value: tuple[float, float], seeds: int, signed: bool = False) -> str:
    mean, std = value
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if seeds <= 1 else f"{text} ± {std:.2f}"


def markdown(args, accuracies, sets, summary, kinds, check, environment) -> str:
    methods = list(accuracies)
    seeds = {m: len(accuracies[m]["clean"]) for m in methods}
    header = "| | " + " | ".join(f"{LABELS[m]} (n={seeds[m]})" for m in methods) + " |"
    rule = "|---" * (len(methods) + 1) + "|"
    lines = ["# Contrastive inference on Fashion-MNIST: feed-forward vs second stage on r_x vs the (p, h) control", "",
             f"Model: shipped `resnet-fmnist` (quarter-width CIFAR ResNet-18 layout). Second stages: 3-layer MLP "
             f"(hidden 256, 128), Adam, at most {args.max_epochs} epochs, early stopping (patience {args.patience}) on "
             "10 % of the clean training set; trained on the clean Fashion-MNIST training set only. Accuracy in %, "
             "mean ± std over MLP seeds (n per column); feed-forward has no seed. Corruptions and shifts: the 5,000-"
             "image 'eval' part of the test split; clean: all 10,000 test images.", "",
             "## Overall", "", header, rule]
    for group, row in summary.items():
        lines.append(f"| {group} | " + " | ".join(_cell(row[m], seeds[m]) for m in methods) + " |")
    lines += ["", "Gains in points (difference of the means; ± combines the two columns' stds over seeds):", "",
              "| | " + " | ".join(summary) + " |", "|---" * (len(summary) + 1) + "|"]
    for key in next(iter(summary.values())):
        if " - " in key:
            first, second = key.split(" - ")
            lines.append(f"| {LABELS[first]} − {LABELS[second]} | "
                         + " | ".join(_cell(row[key], 2, signed=True) for row in summary.values()) + " |")
    lines += ["", "## Per challenge type (mean over levels)", "", header, rule]
    for kind, row in kinds.items():
        lines.append(f"| {kind} | " + " | ".join(_cell(row[m], seeds[m]) for m in methods) + " |")
    lines += ["", "## Per type and level", "", header.replace("| |", "| set |", 1), rule]
    for name in sets:
        lines.append(f"| {name} | " + " | ".join(_cell(_mean_std(accuracies[m][name]), seeds[m]) for m in methods) + " |")
    if check:
        lines += ["", "## Engine check", "",
                  f"The (compact, seed {args.seeds[0]}) MLP installed as the bundle's `contrastive` head: "
                  f"`Probe.contrastive_predict` on the 10,000 clean test images agrees with the torch MLP on "
                  f"{100 * check['agreement_with_torch_mlp']:.2f} % of them; accuracy "
                  f"{100 * check['contrastive_accuracy']:.2f} % (feed-forward {100 * check['feed_forward_accuracy']:.2f} %)."]
    lines += ["", "## Environment", "", f"`{json.dumps(environment)}`", "",
              f"Reproduce: `python -m benchmarks.contrastive {' '.join(environment['argv'])}`", ""]
    return "\n".join(lines)


def plot(accuracies: dict, kinds: dict, summary: dict, path: Path) -> None:
    """Feed-forward accuracy per challenge (top) and each second stage's gain over it (bottom, ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["clean", *kinds]
    clean_row = summary["clean test"]
    rows = [clean_row, *kinds.values()]
    methods = [m for m in accuracies if m != "feed_forward"]
    x = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.2]})
    ff = [row["feed_forward"][0] for row in rows]
    top.bar(x, ff, color="#4c72b0")
    for xi, value in zip(x, ff):
        top.text(xi, value + 1, f"{value:.1f}", ha="center", fontsize=7)
    top.set_ylabel("feed-forward accuracy (%)")
    top.set_ylim(0, 105)
    top.set_title("Contrastive inference on Fashion-MNIST (shipped ResNet): accuracy per challenge, mean over levels")
    width = 0.8 / len(methods)
    colours = {"compact": "#dd8452", "norms": "#55a868", "full": "#c44e52", CONTROL: "#8c8c8c"}
    for index, method in enumerate(methods):
        gains = [row[method][0] - row["feed_forward"][0] for row in rows]
        errors = [row[method][1] for row in rows]
        bottom.bar(x - 0.4 + width * (index + 0.5), gains, width, yerr=errors, capsize=2, label=LABELS[method],
                   color=colours.get(method))
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("gain over feed-forward (points)")
    bottom.legend(fontsize=8, ncol=len(methods))
    bottom.set_xticks(x)
    bottom.set_xticklabels([n.replace("corruption/", "").replace("shift/", "shift: ") for n in names], rotation=35,
                           ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)


# -------------------------------------------------------------------------------------------- speed
def speed(args, trained: Path, plain: Path) -> dict:
    """contrastive_predict (trained bundle) vs run (plain bundle) and run (trained bundle), interleaved."""
    images = data.fashion_mnist("test")[0]
    options = dict(threads=args.threads, spinning=False)
    engines = {"run (no r_x, no head)": gradprobe.load(plain, **options).run,
               "run (r_x + head)": gradprobe.load(trained, **options).run,
               "contrastive_predict": gradprobe.load(trained, **options).contrastive_predict}
    rows = {}
    for batch, rounds in ((1, args.rounds_1), (64, args.rounds_64)):
        batch_images = np.ascontiguousarray(images[:batch])
        policies = {name: timing.RoundsPolicy(0.0, 1, 1, warmup=3) for name in engines}
        seconds = timing.time_interleaved(engines, batch_images, policies, {name: rounds for name in engines})
        rows[batch] = {name: timing.summarize(s) for name, s in seconds.items()}
        base = rows[batch]["run (no r_x, no head)"]["median_ms"]
        rows[batch]["ratio contrastive_predict / run (no r_x, no head)"] = \
            rows[batch]["contrastive_predict"]["median_ms"] / base
        rows[batch]["ratio run (r_x + head) / run (no r_x, no head)"] = rows[batch]["run (r_x + head)"]["median_ms"] / base
    return rows


def speed_markdown(rows: dict, environment: dict) -> str:
    names = ["run (no r_x, no head)", "run (r_x + head)", "contrastive_predict"]
    lines = ["# Contrastive inference: speed", "",
             "Shipped ResNet. `run (no r_x, no head)`: `Probe.run` on the bundle exported without contrastive features "
             "(every other output as usual); `run (r_x + head)` and `contrastive_predict`: the bundle with r_x "
             "(compact) and the trained contrastive head, one engine call each. Interleaved round-robin in one process "
             f"(rotated order), ONNX Runtime with spinning off and {environment['threads']} pinned thread(s); "
             "Fashion-MNIST test images.", "",
             "| engine | batch 1: median ms | p90 ms | n | batch 64: median ms | p90 ms | n |", "|---|---|---|---|---|---|---|"]
    for name in names:
        cells = [f"{rows[b][name]['median_ms']:.3f} | {rows[b][name]['p90_ms']:.3f} | {rows[b][name]['n']}" for b in (1, 64)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ratio = "ratio contrastive_predict / run (no r_x, no head)"
    lines += ["", "| batch | contrastive_predict / run (no r_x, no head) | run (r_x + head) / run (no r_x, no head) |",
              "|---|---|---|"]
    for batch in (1, 64):
        lines.append(f"| {batch} | {rows[batch][ratio]:.3f} | "
                     f"{rows[batch]['ratio run (r_x + head) / run (no r_x, no head)']:.3f} |")
    measured = rows[64][ratio]
    lines += ["", f"- target contrastive_predict / run <= {SPEED_TARGET} at batch 64: "
                  f"**{'HOLDS' if measured <= SPEED_TARGET else 'MISSED'}** (measured {measured:.3f})",
              f"- load average before / after: {environment['load_before']} / {environment['load_after']} on "
              f"{os.cpu_count()} cores (other engineers share this machine)",
              f"- reproduce: `python -m benchmarks.contrastive {' '.join(environment['argv'])}` (after the accuracy "
              "part, which trains the head)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- run
def _seeds(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=("accuracy", "speed", "all"), default="all")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2, 3, 4], help="MLP seeds (comma-separated)")
    parser.add_argument("--full-seeds", type=_seeds, default=[0, 1, 2],
                        help="seeds of the full variant, whose MLP is 10x larger (comma-separated)")
    parser.add_argument("--variants", type=lambda t: t.split(","), default=["compact", "norms", "full"],
                        help="r_x variants to train on (comma-separated)")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--n-eval", type=int, default=None, help="images per challenge set (default: all 5,000)")
    parser.add_argument("--limit-train", type=int, default=None, help="training images (default: all 60,000)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads in the speed part")
    parser.add_argument("--rounds-1", type=int, default=300)
    parser.add_argument("--rounds-64", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for contrastive*.md/.json/.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args) -> int:
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    environment = {"argv": getattr(args, "argv", sys.argv[1:]), "gradprobe": gradprobe.__version__,
                   "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads,
                   "load_before": [round(v, 2) for v in os.getloadavg()]}
    features = bundle_path("features")
    workdir = data.cache_dir() / "contrastive" / "bundles"
    payload = {}
    if args.part in ("accuracy", "all"):
        probe = gradprobe.load(features, threads=1)
        train_images, train_labels = data.fashion_mnist("train")
        limit = args.limit_train or len(train_images)
        train = extract(probe, f"train-{limit}", lambda: (train_images[:limit], train_labels[:limit]), args.progress)
        sets = {("clean" if group == "clean" else f"{group}/{kind}/{level}"): load
                for group, kind, level, load in image_sets(args.n_eval)}
        accuracies, kept = accuracy_table(args, probe, sets, train)
        check = engine_check(features, kept, workdir)
        summary, kinds = summarize(accuracies, sets), per_kind(accuracies, sets)
        environment["load_after"] = [round(v, 2) for v in os.getloadavg()]
        payload = {"accuracies": accuracies, "summary": summary, "per_kind": kinds, "engine_check": check,
                   "fits": kept["fits"], "environment": environment, "train_images": limit}
        atomic_write_text(args.out / "contrastive.md", markdown(args, accuracies, sets, summary, kinds, check,
                                                                environment))
        atomic_write_text(args.out / "contrastive.json", json.dumps(payload, indent=1) + "\n")
        plot(accuracies, kinds, summary, args.out / "contrastive.png")
        print(markdown(args, accuracies, sets, summary, kinds, check, environment).split("## Per challenge")[0])
    if args.part in ("speed", "all"):
        trained = workdir / "trained"
        if not (trained / "manifest.json").exists():
            raise gradprobe.NotFittedError(f"{trained} is made by the accuracy part; run --part accuracy first")
        environment["load_before"] = [round(v, 2) for v in os.getloadavg()]
        rows = speed(args, trained, bundle_path("plain"))
        environment["load_after"] = [round(v, 2) for v in os.getloadavg()]
        text = speed_markdown(rows, environment)
        atomic_write_text(args.out / "contrastive_speed.md", text)
        atomic_write_text(args.out / "contrastive_speed.json",
                          json.dumps({"batches": rows, "environment": environment}, indent=1) + "\n")
        print(text)
    return 0


#: For ``benchmarks/cli.py``: name -> (help, add_arguments, run).
EVALUATIONS = {"contrastive": ("contrastive inference vs feed-forward and the (p, h) control on clean, corrupted "
                               "and shifted Fashion-MNIST; contrastive_predict speed", add_arguments, run)}


def main(argv=None) -> int:
    from .cli import evaluation_main

    return evaluation_main("contrastive", argv)


if __name__ == "__main__":
    sys.exit(main())
