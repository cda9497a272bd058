"""``gradprobe eval ood|corruption`` and ``gradprobe calibrate``: detectors beside pytorch-ood's, one run.

Protocol: Fashion-MNIST test split cut into disjoint parts (``ood_data.FMNIST_PARTS``); detectors fit on
the "fit" parts of in-distribution and OOD data, every metric is computed on the "eval" parts. The
supervised detectors (paper, last-layer) see a labelled fit split of the very OOD set they are scored on
(the paper's protocol, as Mahalanobis "P+FE"); "paper, fit on digits" shows how that MLP transfers to
the other OOD sets. Peers run in the peers venv on the bundle's own weights (benchmarks/peers/ood_peers.py).
Metrics (scikit-learn), OOD = positive, score higher = more anomalous: detection accuracy
max_t ½(TPR + TNR), AUROC, AUPR-in (in-distribution positive), AUPR-out, FPR of OOD at 95% in-dist TPR.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import detect as dt
from . import ood_data as od
from .errors import BackendUnavailableError, InputError

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METRICS = ("det_acc", "auroc", "aupr_in", "aupr_out", "fpr95")
PEERS = ("MSP", "ODIN", "Energy", "Mahalanobis", "pytorch-ood GradNorm (fc.weight)", "pytorch-ood GradUncertainty (fc)")


def metrics(in_scores, out_scores) -> dict:
    """The five numbers of the seed's tables, in percent (scikit-learn)."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.r_[in_scores, out_scores].astype(np.float64)
    is_ood = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    fpr, tpr, _ = roc_curve(is_ood, scores)
    in_fpr, in_tpr, _ = roc_curve(1 - is_ood, -scores)  # in-distribution as positive
    return {"det_acc": 100 * float(np.max(0.5 * (tpr + 1 - fpr))),
            "auroc": 100 * float(roc_auc_score(is_ood, scores)),
            "aupr_in": 100 * float(average_precision_score(1 - is_ood, -scores)),
            "aupr_out": 100 * float(average_precision_score(is_ood, scores)),
            "fpr95": 100 * float(in_fpr[np.searchsorted(in_tpr, 0.95, side="left")])}


def default_bundle(layer_grads: bool = True) -> Path:
    """The shipped model exported once per gradprobe version into the cache (with per-layer gradients if asked).

    Per-layer gradients cost: the probe graph takes ~0.25 ms per image without them and ~3 ms with them
    (ONNX Runtime + norm kernels, batch 64, 2 quiet cores; benchmarks/results/layer_grads.md).
    """
    import gradprobe

    name = f"resnet-fmnist{'-layers' if layer_grads else ''}-{gradprobe.__version__}"
    path = od.cache_dir() / "bundles" / name
    if not (path / "manifest.json").exists():
        model = gradprobe.models.load_pretrained("resnet-fmnist")
        gradprobe.export(model, od.fmnist_part("fit", 4)[0], path, layer_grads=layer_grads)
    return path


def peers_python() -> Path | None:
    """The peers venv's python ($GRADPROBE_PEERS_PYTHON or the checkout's .venv-peers); None when missing."""
    from gradprobe.bench import find_peers_python

    return find_peers_python(root=ROOT)[0]


def peer_scores(bundle: Path, sets: dict, fit: tuple) -> dict:
    """{detector: {set: scores}} from pytorch-ood in the peers venv; {} (with a note) when it is missing."""
    python, weights = peers_python(), bundle / "model.safetensors"
    if python is None or not weights.exists():
        print("note: peers skipped (need .venv-peers from `make peers` and a bundle with model.safetensors)",
              file=sys.stderr)
        return {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        np.savez(folder / "sets.npz", **sets)
        np.savez(folder / "fit.npz", images=fit[0], labels=fit[1])
        script = ROOT / "benchmarks" / "peers" / "ood_peers.py"
        run = subprocess.run([str(python), str(script), str(weights), str(folder / "sets.npz"),
                              str(folder / "fit.npz"), str(folder / "out.npz")], capture_output=True, text=True)
        if run.returncode != 0:
            raise BackendUnavailableError(f"the peers script failed:\n{run.stderr[-3000:]}")
        out = {}
        with np.load(folder / "out.npz") as npz:
            for key in npz.files:
                detector, name = key.split("/", 1)
                out.setdefault(detector, {})[name] = npz[key]
    return out


class _Ours:
    """Our detectors fitted once on the in-distribution fit split; the supervised ones per OOD fit set."""

    def __init__(self, probe, n_fit: int):
        self.probe = probe
        self.fit_in = probe.run(od.fmnist_part("fit", n_fit)[0])
        self.deep = self.fit_in.layer_grad_sqnorm is not None
        self.free = dt.GaussianDetector().fit(dt.gradient_features(self.fit_in, "all"))

    def names(self):
        paper = "paper (MLP, per-layer)" if self.deep else "paper (MLP, last layer: no layer_grad_sqnorm)"
        return paper, "last-layer MLP", "ood-free (Gaussian)", "GradNorm closed form (ours)"

    def mlp(self, ood_fit_result, layers: str):
        features = [dt.gradient_features(r, layers) for r in (self.fit_in, ood_fit_result)]
        labels = np.r_[np.zeros(len(features[0]), int), np.ones(len(features[1]), int)]
        return dt.MLPDetector().fit(np.vstack(features), labels)

    def scores(self, result, mlps: dict) -> dict:
        paper, last, free, gradnorm = self.names()
        out = {free: self.free.score(dt.gradient_features(result, "all")), gradnorm: dt.gradnorm_score(result)}
        for name, (detector, layers) in mlps.items():
            out[name] = detector.score(dt.gradient_features(result, layers))
        return out

    def mlps(self, ood_fit_result, extra: dict | None = None) -> dict:
        paper, last, _, _ = self.names()
        found = {paper: (self.mlp(ood_fit_result, "all"), "all")}
        if self.deep:
            found[last] = (self.mlp(ood_fit_result, "last"), "last")
        return {**found, **(extra or {})}


def _table(rows: list, methods: list, metric_names=METRICS) -> str:
    """The seed's layout: one row per pair, one column per metric, methods slash-joined in each cell."""
    head = {"det_acc": "Det. acc", "auroc": "AUROC", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out",
            "fpr95": "FPR@95TPR ↓"}
    lines = ["| In → Out | " + " | ".join(head[m] for m in metric_names) + " |",
             "|---|" + "---|" * len(metric_names)]
    for label, per_method in rows:
        cells = ["/".join(f"{per_method[m][k]:.2f}" if m in per_method else "–" for m in methods)
                 for k in metric_names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _long_table(rows: list, methods: list) -> str:
    lines = ["| In → Out | method | Det. acc | AUROC | AUPR-in | AUPR-out | FPR@95TPR ↓ |",
             "|---|---|---|---|---|---|---|"]
    for label, per_method in rows:
        for m in methods:
            if m in per_method:
                lines.append(f"| {label} | {m} | " + " | ".join(f"{per_method[m][k]:.2f}" for k in METRICS) + " |")
    return "\n".join(lines)


def _roc_png(curves: dict, path: Path, title: str):
    """curves: {panel: {method: (in_scores, out_scores)}} -> one ROC panel each (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    for ax, (panel, methods) in zip(axes[0], curves.items()):
        for method, (a, b) in methods.items():
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])
            ax.plot(fpr, tpr, lw=1, label=method)
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set(title=panel, xlabel="FPR (in-dist flagged)", ylabel="TPR (OOD flagged)")
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _write(stem: str, out: Path, markdown: str, payload: dict):
    from .fileio import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.md", markdown)
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=1) + "\n")


def eval_ood(bundle=None, *, n_in: int = 2000, n_ood: int = 1000, n_fit: int = 1000, n_ood_fit: int = 300,
             peers: bool = True, out: Path = RESULTS, sets=tuple(od.OOD_SETS), layer_grads: bool = True) -> dict:
    """Fashion-MNIST -> each OOD set: our detectors and the peers, same model, same eval images."""
    import gradprobe

    bundle = Path(bundle) if bundle else default_bundle(layer_grads)
    probe = gradprobe.load(bundle)
    ours = _Ours(probe, n_fit)
    in_images = od.fmnist_part("eval", n_in)[0]
    eval_sets = {"fmnist": in_images, **{s: od.ood_set(s, "eval", n_ood) for s in sets}}
    results = {name: probe.run(images) for name, images in eval_sets.items()}
    fit_results = {s: probe.run(od.ood_set(s, "fit", n_ood_fit)) for s in sets}
    transfer = {"paper, fit on digits": (ours.mlp(fit_results["digits"], "all"), "all")} if "digits" in sets else {}
    peer = peer_scores(bundle, eval_sets, od.fmnist_part("fit", n_fit)) if peers else {}
    methods = [*ours.names()[:2], *transfer, *ours.names()[2:], *[p for p in PEERS if p in peer]]
    methods = [m for m in methods if m != "last-layer MLP" or ours.deep]
    rows, payload, curves = [], {}, {}
    for s in sets:
        mlps = ours.mlps(fit_results[s], transfer)
        in_scores, out_scores = ours.scores(results["fmnist"], mlps), ours.scores(results[s], mlps)
        for name in peer:
            in_scores[name], out_scores[name] = peer[name]["fmnist"], peer[name][s]
        per = {m: metrics(in_scores[m], out_scores[m]) for m in methods if m in in_scores}
        rows.append((f"FMNIST → {s}", per))
        payload[s] = per
        curves[s] = {m: (in_scores[m], out_scores[m]) for m in methods if m in in_scores}
    sizes = {"in_dist_eval": len(in_images), "ood_eval": {s: len(eval_sets[s]) for s in sets},
             "in_dist_fit": n_fit, "ood_fit": {s: int(len(fit_results[s])) for s in sets}}
    markdown = "\n\n".join([
        "# OOD detection: Fashion-MNIST → OOD sets", _describe(bundle, probe, sizes),
        "Cells list the methods in this order: " + " / ".join(methods) + ".",
        _table(rows, methods), "## Every method, one row each", _long_table(rows, methods)]) + "\n"
    _write("detect_ood", Path(out), markdown, {"methods": methods, "sizes": sizes, "results": payload,
                                               "ood_sets": {s: od.OOD_SETS[s] for s in sets}})
    _roc_png(curves, Path(out) / "roc_ood.png", "Fashion-MNIST vs OOD (OOD = positive)")
    print(markdown)
    return payload


def eval_corruption(bundle=None, *, n: int = 300, n_fit: int = 1000, n_corrupt_fit: int = 300, peers: bool = True,
                    out: Path = RESULTS, kinds=od.CORRUPTIONS, levels=od.LEVELS, layer_grads: bool = True) -> dict:
    """Clean Fashion-MNIST eval images vs the same images corrupted, per type x level."""
    import gradprobe

    bundle = Path(bundle) if bundle else default_bundle(layer_grads)
    probe = gradprobe.load(bundle)
    ours = _Ours(probe, n_fit)
    eval_sets = {"clean": od.fmnist_part("eval", n)[0]}
    for kind in kinds:
        for level in levels:
            eval_sets[f"{kind}-{level}"] = od.corrupted_fmnist(kind, level, "eval", n)[0]
    results = {name: probe.run(images) for name, images in eval_sets.items()}
    peer = peer_scores(bundle, eval_sets, od.fmnist_part("fit", n_fit)) if peers else {}
    methods = [*ours.names(), *[p for p in PEERS if p in peer]]
    methods = [m for m in methods if m != "last-layer MLP" or ours.deep]
    payload, curves, rows = {}, {}, []
    for kind in kinds:
        for level in levels:
            key = f"{kind}-{level}"
            fit = probe.run(od.corrupted_fmnist(kind, level, "fit", n_corrupt_fit)[0])
            mlps = ours.mlps(fit)
            in_scores, out_scores = ours.scores(results["clean"], mlps), ours.scores(results[key], mlps)
            for name in peer:
                in_scores[name], out_scores[name] = peer[name]["clean"], peer[name][key]
            per = {m: metrics(in_scores[m], out_scores[m]) for m in methods}
            payload[key] = per
            rows.append((f"FMNIST → {kind} L{level}", per))
            if level == 3:
                curves[f"{kind} L3"] = {m: (in_scores[m], out_scores[m]) for m in methods}
    sizes = {"eval_per_set": n, "in_dist_fit": n_fit, "corrupted_fit_per_set": n_corrupt_fit}
    by_level = []
    for metric, label in (("auroc", "AUROC"), ("fpr95", "FPR@95TPR ↓")):
        lines = [f"### {label} by corruption and level (methods slash-joined)",
                 "| type | " + " | ".join(f"L{lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
        for kind in kinds:
            lines.append(f"| {kind} | " + " | ".join(
                "/".join(f"{payload[f'{kind}-{lv}'][m][metric]:.1f}" for m in methods) for lv in levels) + " |")
        by_level.append("\n".join(lines))
    means = {m: {k: float(np.mean([payload[key][m][k] for key in payload])) for k in METRICS} for m in methods}
    markdown = "\n\n".join([
        "# Corrupted-input detection: clean vs corrupted Fashion-MNIST", _describe(bundle, probe, sizes),
        "Cells list the methods in this order: " + " / ".join(methods) + ".",
        "## Mean over all 40 type × level sets", _long_table([("FMNIST → corrupted (mean)", means)], methods),
        *by_level, "## Every set, seed layout", _table(rows, methods)]) + "\n"
    _write("detect_corruption", Path(out), markdown, {"methods": methods, "sizes": sizes, "results": payload,
                                                      "mean": means})
    _roc_png(dict(list(curves.items())[:4]), Path(out) / "roc_corruption_a.png", "clean vs corrupted, level 3")
    _roc_png(dict(list(curves.items())[4:]), Path(out) / "roc_corruption_b.png", "clean vs corrupted, level 3")
    print(markdown)
    return payload


def _describe(bundle, probe, sizes) -> str:
    features = "per-layer (layer_grad_sqnorm)" if probe.run(od.fmnist_part("fit", 1)[0]).layer_grad_sqnorm is not None \
        else "last Linear only (confounding_grad_sqnorm: weight, bias)"
    return (f"Model: {probe.manifest['model']['class']} ({probe.manifest['model']['parameters']:,} parameters), "
            f"bundle `{Path(bundle).name}`. Gradient features: {features}, log-scaled. Sizes: {json.dumps(sizes)}. "
            "Metrics in %, OOD positive, scores higher = more anomalous; fit and eval images disjoint. "
            "Mahalanobis is pytorch-ood's vanilla version (penultimate features, no input preprocessing, "
            "no feature ensemble). Supervised MLPs see a labelled fit split of the OOD set they are scored on.")


def _calibrate(args):
    import gradprobe

    probe = gradprobe.load(args.bundle)
    in_dist = od.fmnist_part("fit", args.n_in)[0]
    ood = None if args.kind == "ood-free" else od.ood_set(args.ood, "fit", args.n_ood)
    description = {"in_dist": f"Fashion-MNIST test split, ood_data part 'fit' ({len(in_dist)} images)",
                   "ood": None if ood is None else
                   f"{args.ood}: {od.OOD_SETS[args.ood]}, part 'fit' ({len(ood)} images)"}
    section = probe.calibrate(in_dist, ood, kind=args.kind, tpr=args.tpr, seed=args.seed, description=description)
    print(json.dumps(section, indent=2))


def add_detect_commands(commands) -> None:
    """``gradprobe calibrate`` and ``gradprobe eval {ood,corruption}`` on an argparse subparsers object."""
    calibrate = commands.add_parser("calibrate", help="fit an OOD detector and store it in the bundle")
    calibrate.add_argument("bundle")
    calibrate.add_argument("--kind", default="paper", choices=dt.KINDS)
    calibrate.add_argument("--ood", default="digits", choices=sorted(od.OOD_SETS),
                           help="OOD set for the MLP kinds")
    calibrate.add_argument("--n-in", type=int, default=2000,
                           help="Fashion-MNIST fit images (half train, half threshold)")
    calibrate.add_argument("--n-ood", type=int, default=300)
    calibrate.add_argument("--tpr", type=float, default=0.95, help="in-distribution acceptance rate of the threshold")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.set_defaults(handler=_calibrate)

    evaluate = commands.add_parser("eval", help="OOD / corrupted-input detection tables beside the peer detectors")
    which = evaluate.add_subparsers(dest="what", required=True)
    for name, help_text in (("ood", "Fashion-MNIST vs OOD sets"), ("corruption", "clean vs corrupted Fashion-MNIST")):
        sub = which.add_parser(name, help=help_text)
        sub.add_argument("--bundle", default=None, help="default: the shipped model, exported into the cache")
        sub.add_argument("--n", type=int, default=2000 if name == "ood" else 300, help="eval images per set")
        sub.add_argument("--no-peers", action="store_true", help="skip pytorch-ood (peers venv)")
        sub.add_argument("--layer-grads", action=argparse.BooleanOptionalAction, default=True,
                         help="default bundle with per-layer gradient norms (about 12x the plain graph at batch 64)")
        sub.add_argument("--out", default=str(RESULTS), help="folder for the .md, .json and ROC .png")
        sub.set_defaults(handler=_eval, what=name)


def _eval(args):
    if args.n < 10:
        raise InputError(f"--n must be at least 10, got {args.n}")
    if args.what == "ood":
        eval_ood(args.bundle, n_in=args.n, n_ood=min(args.n, 1000), peers=not args.no_peers, out=Path(args.out),
                 layer_grads=args.layer_grads)
    else:
        eval_corruption(args.bundle, n=args.n, peers=not args.no_peers, out=Path(args.out),
                        layer_grads=args.layer_grads)
