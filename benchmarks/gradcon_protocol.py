"""GradCon on Fashion-MNIST under the GPND protocol, beside the seed's numbers (METHODS.md §2, research §8.4).

Protocol: train and test pooled (70,000), each class cut into 5 folds (gradprobe.data.gpnd_folds): folds
0-2 train one model per normal class, fold 3 validates, fold 4 tests. Validation and test sets hold every
normal image of their fold plus outliers from the other classes of the same fold, so that outliers are
10/20/30/40/50 % of the set. AUC: ROC area of the anomaly score (outliers positive; equal to the
authors' AUC of the normality score with normal images positive). F1: normal images positive (as GPND),
at the threshold that maximises F1 on the validation set of the same outlier percentage.
Scores come from the deployed path: each model exported as a bundle and run with ``gradprobe.load``
(ONNX Runtime); β = 0 is the reconstruction-only ablation (same models, same outputs).

    gradprobe eval gradcon --epochs 100      # trains what is missing, then evaluates
    gradprobe eval gradcon --quick           # CI-sized: a few dozen steps per class
(or ``python -m benchmarks.gradcon_protocol ...``)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import timing

RESULTS = Path(__file__).resolve().parent / "results"
PERCENTS = (10, 20, 30, 40, 50)
#: The seed's Fashion-MNIST table (GradCon paper; research/methods.md §8.4), per outlier percentage.
SEED = {"auc": (0.938, 0.933, 0.935, 0.936, 0.934), "f1": (0.967, 0.945, 0.924, 0.905, 0.871)}
SEED_GRAD_ONLY = {"auc": (0.931, 0.925, 0.926, 0.928, 0.926), "f1": (0.964, 0.939, 0.917, 0.899, 0.870)}
GPND = {"auc": (0.928, 0.932, 0.933, 0.933, 0.933), "f1": (0.968, 0.945, 0.917, 0.891, 0.864)}


def models_dir(epochs: int, seed: int, quick: bool) -> Path:
    from gradprobe.data import cache_dir

    return cache_dir() / "gradcon" / ("quick" if quick else f"e{epochs}-s{seed}")


def train_models(classes, epochs: int, seed: int, quick: bool, threads: int, snapshots=()) -> dict:
    """Train every missing model (saving the shorter runs in ``snapshots`` on the way); return
    {class: training record} read back from the checkpoints."""
    from gradprobe.export.checkpoint import read_metadata
    from gradprobe.export.gradcon import train_normal_class

    records = {}
    for cls in classes:
        path = models_dir(epochs, seed, quick) / f"class-{cls}.safetensors"
        if not path.exists():
            extra = {e: models_dir(e, seed, False) / f"class-{cls}.safetensors" for e in snapshots if e < epochs}
            train_normal_class(cls, path, epochs=epochs, seed=seed, quick=quick, threads=threads,
                               progress=sys.stderr.isatty(),
                               snapshots={e: p for e, p in extra.items() if not p.exists()})
        records[cls] = read_metadata(path)["training"]
    return records


def metrics(score_val, outlier_val, score_test, outlier_test) -> dict:
    """AUC (anomalies positive) and F1 (normal positive) at the validation threshold of highest F1: the
    threshold rule ``GradConProbe.calibrate`` uses with labelled data."""
    from sklearn.metrics import roc_auc_score

    from gradprobe.detect import f1_of_normal, threshold_max_f1

    threshold = threshold_max_f1(score_val, outlier_val)
    return {"auc": float(roc_auc_score(outlier_test, score_test)),
            "f1": f1_of_normal(score_test, outlier_test, threshold), "threshold": threshold}


def deployed_scorer(model_path: Path, workdir: Path, threads: int):
    """images -> GradConResult through the deployed path: the model exported as a bundle, loaded with
    ``gradprobe.load`` (ONNX Runtime, spinning off, pinned threads)."""
    import gradprobe
    from gradprobe.export.gradcon import load_gradcon

    model, metadata = load_gradcon(model_path)
    bundle = gradprobe.export(model, None, workdir / model_path.stem, training=metadata.get("training"))
    return gradprobe.load(bundle, threads=threads, spinning=False)


def evaluate(classes, folder: Path, threads: int, limit: int | None = None) -> dict:
    """Per class and outlier percentage: AUC and F1 of GradCon (the bundle's β), of reconstruction alone
    (β = 0) and of the cosine alone, all as anomaly scores (higher = more anomalous)."""
    from gradprobe.data import fashion_mnist_pooled, gpnd_folds, gpnd_split

    images, labels = fashion_mnist_pooled()
    folds = gpnd_folds(labels, 0)
    per_class = {}
    with tempfile.TemporaryDirectory() as workdir:
        for cls in classes:
            started = time.perf_counter()
            splits = {}
            for percent in PERCENTS:
                split = gpnd_split(labels, folds, cls, percent)
                for name in ("val", "test"):
                    index, is_outlier = split[name], split[f"{name}_outlier"]
                    if limit:  # quick mode: the first `limit` normal images, outliers kept in proportion
                        keep = np.r_[np.flatnonzero(~is_outlier)[:limit],
                                     np.flatnonzero(is_outlier)[:int(limit * percent // (100 - percent))]]
                        index, is_outlier = index[keep], is_outlier[keep]
                    splits[percent, name] = (index, is_outlier)
            needed = np.unique(np.concatenate([index for index, _ in splits.values()]))
            with deployed_scorer(folder / f"class-{cls}.safetensors", Path(workdir), threads) as probe:
                outputs = probe.run(images[needed])
                beta = probe.section.beta
            recon, cosine = outputs.recon_loss.astype(np.float64), outputs.cosine.astype(np.float64)
            variants = {"gradcon": recon - beta * cosine.mean(1), "recon": recon, "grad": -cosine.mean(1)}
            rows = {}
            for percent in PERCENTS:
                (val, val_out), (test, test_out) = splits[percent, "val"], splits[percent, "test"]
                val, test = np.searchsorted(needed, val), np.searchsorted(needed, test)
                rows[percent] = {name: metrics(v[val], val_out, v[test], test_out) for name, v in variants.items()}
                rows[percent]["sizes"] = {"val": len(val), "test": len(test), "test_outliers": int(test_out.sum())}
            per_class[cls] = {"rows": rows, "seconds": time.perf_counter() - started}
            auc = [rows[p]["gradcon"]["auc"] for p in PERCENTS]
            print(f"class {cls}: AUC {np.round(auc, 3).tolist()} ({per_class[cls]['seconds']:.0f} s)", flush=True)
    return per_class


def summarize(per_class: dict) -> dict:
    table = {}
    for percent in PERCENTS:
        row = {}
        for variant in ("gradcon", "recon", "grad"):
            for metric in ("auc", "f1"):
                values = [per_class[c]["rows"][percent][variant][metric] for c in per_class]
                row[f"{variant}_{metric}"] = float(np.mean(values))
                row[f"{variant}_{metric}_std"] = float(np.std(values))
        table[percent] = row
    return table


def markdown(result: dict) -> str:
    table, training = result["table"], result["training"]
    lines = [f"# GradCon on Fashion-MNIST (GPND protocol), mean over {len(result['classes'])} classes", "",
             f"Models: {training['epochs_per_model']} epochs each (Adam 1e-3, batch 64, α = {result['alpha']}), "
             f"model kept at the epoch of lowest validation J; training all models took "
             f"{training['total_cpu_seconds'] / 60:.1f} min of CPU time ({training['total_seconds'] / 60:.1f} min "
             f"wall on a shared machine), {training['threads']} thread per model ({training['machine']}). "
             f"Score β = {result['beta']}. Scores from the deployed bundles "
             "(gradprobe.load, ONNX Runtime on CPU).", "",
             "| outlier % | AUC ours | AUC β=0 (recon) | AUC seed | F1 ours | F1 β=0 (recon) | F1 seed |",
             "|---|---|---|---|---|---|---|"]
    for k, percent in enumerate(PERCENTS):
        row = table[percent]
        lines.append(f"| {percent} | {row['gradcon_auc']:.3f} | {row['recon_auc']:.3f} | {SEED['auc'][k]:.3f} | "
                     f"{row['gradcon_f1']:.3f} | {row['recon_f1']:.3f} | {SEED['f1'][k]:.3f} |")
    mean = {key: np.mean([table[p][key] for p in PERCENTS]) for key in ("gradcon_auc", "recon_auc", "grad_auc")}
    lines += ["", f"Mean AUC over the percentages: ours {mean['gradcon_auc']:.3f}, β=0 {mean['recon_auc']:.3f}, "
              f"cosine alone {mean['grad_auc']:.3f}; seed {np.mean(SEED['auc']):.3f}, "
              f"GPND {np.mean(GPND['auc']):.3f}.", "",
              "Per class (AUC at 50 % outliers: ours / β=0 / cosine alone):", "",
              "| class | " + " | ".join(str(c) for c in result["classes"]) + " |",
              "|---|" + "---|" * len(result["classes"])]
    for variant in ("gradcon", "recon", "grad"):
        cells = [f"{result['per_class'][str(c)]['rows']['50'][variant]['auc']:.3f}" for c in result["classes"]]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis, metric in zip(axes, ("auc", "f1")):
        for label, values, style in (
                ("ours (GradCon)", [result["table"][p][f"gradcon_{metric}"] for p in PERCENTS], "o-"),
                ("ours, β = 0", [result["table"][p][f"recon_{metric}"] for p in PERCENTS], "s--"),
                ("seed (paper)", SEED[metric], "k^:")):
            axis.plot(PERCENTS, values, style, label=label)
        axis.set_xlabel("outliers in the test set (%)")
        axis.set_ylabel(metric.upper())
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("GradCon, Fashion-MNIST (GPND protocol), mean over classes")
    figure.tight_layout()
    from gradprobe.base.fileio import atomic_path

    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a few dozen steps per class, small eval sets")
    parser.add_argument("--classes", default="0-9", help="e.g. 0-9 or 1,3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--snapshots", default="", help="also keep the models of these shorter runs, e.g. 25,50")
    parser.add_argument("--out", default=str(RESULTS), help="where gradcon.md/.json/.png go")
    parser.add_argument("--name", default=None, help="file stem (default gradcon, or gradcon-quick with --quick)")


def run(args) -> int:
    from gradprobe.export.gradcon import ALPHA, BETA

    classes = _classes(args.classes)
    folder = models_dir(args.epochs, args.seed, args.quick)
    started = time.perf_counter()
    snapshots = [int(v) for v in args.snapshots.split(",") if v]
    records = train_models(classes, args.epochs, args.seed, args.quick, args.threads, snapshots)
    print(f"models in {folder} ({time.perf_counter() - started:.0f} s this run)", flush=True)
    if args.train_only:
        return 0
    per_class = evaluate(classes, folder, args.threads, limit=200 if args.quick else None)
    command = "gradprobe eval gradcon " + " ".join(getattr(args, "argv", sys.argv[1:]))
    epochs = sorted({r["epochs"] for r in records.values()})
    result = {
        "classes": classes, "alpha": ALPHA, "beta": BETA, "quick": args.quick, "command": command.strip(),
        "training": {"epochs_per_model": epochs[0] if len(epochs) == 1 else epochs,
                     "steps_per_model": sorted({r["steps"] for r in records.values()}),
                     "best_epochs": {c: r["best_epoch"] for c, r in records.items()},
                     "seconds_per_model": {c: round(r["seconds"], 1) for c, r in records.items()},
                     "total_seconds": float(sum(r["seconds"] for r in records.values())),
                     "total_cpu_seconds": float(sum(r.get("cpu_seconds", float("nan")) for r in records.values())),
                     "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
        "table": summarize(per_class), "seed_numbers": SEED, "seed_grad_only": SEED_GRAD_ONLY, "gpnd": GPND,
        "per_class": per_class,
    }
    result = json.loads(json.dumps(result))  # int keys -> str, as read back
    result["table"] = {int(k): v for k, v in result["table"].items()}
    out = Path(args.out)
    stem = args.name or ("gradcon-quick" if args.quick else "gradcon")
    timing.publish(stem, markdown(result), result, out)
    plot(result, out / f"{stem}.png")
    return 0


EVALUATIONS = {"gradcon": ("GradCon anomaly detection on Fashion-MNIST under the GPND protocol, beside the seed's "
                           "numbers and the reconstruction-only ablation", add_arguments, run)}


def main(argv=None) -> int:
    from .cli import evaluation_main

    return evaluation_main("gradcon", argv)


def _classes(text: str) -> list[int]:
    if "-" in text:
        low, high = (int(v) for v in text.split("-"))
        return list(range(low, high + 1))
    return [int(v) for v in text.split(",")]


if __name__ == "__main__":
    sys.exit(main())
