"""OOD and corrupted-input detection: gradprobe's registered detectors beside pytorch-ood's, in one run.

Protocol: the Fashion-MNIST test split cut into disjoint parts (``gradprobe.data.FMNIST_PARTS``); detectors
fit on the "fit" parts of in-distribution and OOD data, every metric is computed on the "eval" parts. Every
detector in ``gradprobe.detect.DETECTORS`` is evaluated (a new one appears here with no change): the
unsupervised ones fit on in-distribution features only, the supervised ones (paper, last-layer) also see a
labelled fit split of the very set they are scored on (the paper's protocol, as Mahalanobis "P+FE"); "<kind>,
fit on digits" shows how a supervised detector transfers to the other OOD sets. The peers run in the peers
venv on the bundle's own weights (``benchmarks/peers/ood_peers.py``).
Metrics (scikit-learn), OOD = positive, score higher = more anomalous: detection accuracy
max_t ½(TPR + TNR), AUROC, AUPR-in (in-distribution positive), AUPR-out, FPR of OOD at 95% in-dist TPR.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from gradprobe import data
from gradprobe.base.errors import InputError

from .harness import peers, timing

METRICS = ("det_acc", "auroc", "aupr_in", "aupr_out", "fpr95")
HEADINGS = {"det_acc": "Det. acc", "auroc": "AUROC", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out",
            "fpr95": "FPR@95TPR ↓"}
PEERS = ("MSP", "ODIN", "Energy", "Mahalanobis", "pytorch-ood GradNorm (fc.weight)", "pytorch-ood GradUncertainty (fc)")
GRADNORM = "GradNorm closed form (ours)"
TRANSFER_SET = "digits"


def metrics(in_scores, out_scores) -> dict:
    """The five numbers of the detection tables, in percent (scikit-learn)."""
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
    """The shipped model exported once per gradprobe version into the cache (with per-layer gradients if asked)."""
    import gradprobe

    name = f"resnet-fmnist{'-layers' if layer_grads else ''}-{gradprobe.__version__}"
    path = data.cache_dir() / "bundles" / name
    if not (path / "manifest.json").exists():
        model = gradprobe.models.load_pretrained("resnet-fmnist")
        gradprobe.export(model, data.fmnist_part("fit", 4)[0], path, layer_grads=layer_grads)
    return path


def peer_scores(bundle, sets: dict, fit: tuple, threads: int = 2, python=None) -> dict:
    """{detector: {set: scores}} from pytorch-ood in the peers venv (raises ``peers.PeersUnavailable`` to skip)."""
    spec = peers.model_spec(bundle, threads)
    with tempfile.TemporaryDirectory(prefix="gradprobe-ood-peers-") as folder:
        folder = Path(folder)
        np.savez(folder / "sets.npz", **sets)
        np.savez(folder / "fit.npz", images=fit[0], labels=fit[1])
        spec.update(sets=str(folder / "sets.npz"), fit=str(folder / "fit.npz"), out=str(folder / "out.npz"))
        peers.run_peer("ood_peers.py", spec, python=python, threads=threads, timeout=7200)
        out = {}
        with np.load(folder / "out.npz") as npz:
            for key in npz.files:
                detector, name = key.split("/", 1)
                out.setdefault(detector, {})[name] = npz[key]
    return out


class OurDetectors:
    """Every registered detector on the probe's gradient features, the unsupervised ones fitted once on the
    in-distribution fit split, the supervised ones per labelled OOD fit split; and GradNorm's closed form."""

    def __init__(self, probe, n_fit: int):
        from gradprobe.detect import DETECTORS
        from gradprobe.detect.features import feature_source

        self.fit_in = probe.run(data.fmnist_part("fit", n_fit)[0])
        self.deep = self.fit_in.layer_grad_sqnorm is not None
        self.kinds, self.sources = {}, {}
        for kind, cls in DETECTORS.items():
            source = feature_source(cls.layers, self.fit_in.outputs)
            # without per-layer norms an "all layers" detector reads what a "last layer" one of its class does
            if any(issubclass(cls, other) and source == self.sources[name] for name, other in self.kinds.items()):
                continue
            self.kinds[kind], self.sources[kind] = cls, source
        self.fitted = {kind: cls().fit(self.features(self.fit_in, kind))
                       for kind, cls in self.kinds.items() if not cls.supervised}

    def features(self, result, kind: str) -> np.ndarray:
        from gradprobe.detect import gradient_features

        return gradient_features(result, self.sources[kind])

    @property
    def supervised(self) -> list[str]:
        return [kind for kind, cls in self.kinds.items() if cls.supervised]

    def fit_supervised(self, ood_fit_result) -> dict:
        """{kind: detector} for the supervised kinds, fitted on in-distribution (0) vs ``ood_fit_result`` (1)."""
        fitted = {}
        for kind in self.supervised:
            parts = [self.features(r, kind) for r in (self.fit_in, ood_fit_result)]
            labels = np.r_[np.zeros(len(parts[0]), int), np.ones(len(parts[1]), int)]
            fitted[kind] = self.kinds[kind]().fit(np.vstack(parts), labels)
        return fitted

    def names(self, transfer: dict | None = None) -> list[str]:
        return [*self.supervised, *(transfer or {}), *self.fitted, GRADNORM]

    def scores(self, result, supervised: dict, transfer: dict | None = None) -> dict:
        """{method name: scores} for ``result``; ``transfer``: {name: (kind, detector)} fitted elsewhere."""
        from gradprobe.detect import gradnorm_score

        out = {kind: detector.score(self.features(result, kind)) for kind, detector in supervised.items()}
        out.update({name: detector.score(self.features(result, kind)) for name, (kind, detector) in (transfer or {}).items()})
        out.update({kind: detector.score(self.features(result, kind)) for kind, detector in self.fitted.items()})
        out[GRADNORM] = gradnorm_score(result)
        return out

    def describe(self) -> str:
        return "; ".join(f"{kind}: {cls.__name__} on {self.sources[kind]}" for kind, cls in self.kinds.items())


# -------------------------------------------------------------------------------------------- tables
def table(rows: list, methods: list, metric_names=METRICS) -> str:
    """One row per pair of sets, one column per metric, the methods slash-joined in each cell."""
    lines = ["| In → Out | " + " | ".join(HEADINGS[m] for m in metric_names) + " |",
             "|---|" + "---|" * len(metric_names)]
    for label, per_method in rows:
        cells = ["/".join(f"{per_method[m][k]:.2f}" if m in per_method else "–" for m in methods)
                 for k in metric_names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def long_table(rows: list, methods: list) -> str:
    lines = ["| In → Out | method | " + " | ".join(HEADINGS[m] for m in METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for label, per_method in rows:
        for m in methods:
            if m in per_method:
                lines.append(f"| {label} | {m} | " + " | ".join(f"{per_method[m][k]:.2f}" for k in METRICS) + " |")
    return "\n".join(lines)


def roc_png(curves: dict, path: Path, title: str) -> None:
    """curves: {panel: {method: (in_scores, out_scores)}} -> one ROC panel each, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    from gradprobe.base.fileio import atomic_path

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
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=90, format="png")
    plt.close(fig)


def _describe(bundle, probe, ours: OurDetectors, sizes: dict, skipped: list) -> str:
    manifest = probe.manifest
    features = "per-layer (layer_grad_sqnorm)" if ours.deep else "last Linear only (confounding_grad_sqnorm: weight, bias)"
    text = (f"Model: {manifest.model.class_name} ({manifest.model.parameters:,} parameters), bundle "
            f"`{Path(bundle).name}`. Gradient features: {features}, log-scaled. Detectors: {ours.describe()}. "
            f"Sizes: {json.dumps(sizes)}. Metrics in %, OOD positive, scores higher = more anomalous; fit and eval "
            "images disjoint. Mahalanobis is pytorch-ood's vanilla version (penultimate features, no input "
            "preprocessing, no feature ensemble). Supervised detectors see a labelled fit split of the set they are "
            "scored on.")
    return text + "".join(f"\n\n- {reason}" for reason in skipped)


def _peers_or_skip(bundle, sets, fit, use_peers: bool, python) -> tuple[dict, list[str]]:
    if not use_peers:
        return {}, ["peers skipped: --no-peers"]
    try:
        return peer_scores(bundle, sets, fit, python=python), []
    except peers.PeersUnavailable as error:
        print(f"note: peers skipped: {error}", file=sys.stderr)
        return {}, [f"peers skipped: {error}"]


# ----------------------------------------------------------------------------------------- evaluations
def eval_ood(bundle=None, *, n_in: int = 2000, n_ood: int = 1000, n_fit: int = 1000, n_ood_fit: int = 300,
             use_peers: bool = True, peers_python=None, out=timing.RESULTS, sets=tuple(data.OOD_SETS),
             layer_grads: bool = True) -> dict:
    """Fashion-MNIST -> each OOD set: our detectors and the peers, same model, same eval images."""
    import gradprobe

    bundle = Path(bundle) if bundle else default_bundle(layer_grads)
    probe = gradprobe.load(bundle)
    ours = OurDetectors(probe, n_fit)
    in_images = data.fmnist_part("eval", n_in)[0]
    eval_sets = {"fmnist": in_images, **{s: data.ood_set(s, "eval", n_ood) for s in sets}}
    results = {name: probe.run(images) for name, images in eval_sets.items()}
    fit_results = {s: probe.run(data.ood_set(s, "fit", n_ood_fit)) for s in sets}
    transfer = {}
    if TRANSFER_SET in sets:
        fitted = ours.fit_supervised(fit_results[TRANSFER_SET])
        transfer = {f"{kind}, fit on {TRANSFER_SET}": (kind, detector) for kind, detector in fitted.items()}
    peer, skipped = _peers_or_skip(bundle, eval_sets, data.fmnist_part("fit", n_fit), use_peers, peers_python)
    methods = [*ours.names(transfer), *[p for p in PEERS if p in peer]]
    rows, payload, curves = [], {}, {}
    for s in sets:
        supervised = ours.fit_supervised(fit_results[s])
        in_scores = ours.scores(results["fmnist"], supervised, transfer)
        out_scores = ours.scores(results[s], supervised, transfer)
        for name in peer:
            in_scores[name], out_scores[name] = peer[name]["fmnist"], peer[name][s]
        per = {m: metrics(in_scores[m], out_scores[m]) for m in methods if m in in_scores}
        rows.append((f"FMNIST → {s}", per))
        payload[s] = per
        curves[s] = {m: (in_scores[m], out_scores[m]) for m in methods if m in in_scores}
    sizes = {"in_dist_eval": len(in_images), "ood_eval": {s: len(eval_sets[s]) for s in sets},
             "in_dist_fit": n_fit, "ood_fit": {s: int(len(fit_results[s])) for s in sets}}
    markdown = "\n\n".join([
        "# OOD detection: Fashion-MNIST → OOD sets", _describe(bundle, probe, ours, sizes, skipped),
        "Cells list the methods in this order: " + " / ".join(methods) + ".",
        table(rows, methods), "## Every method, one row each", long_table(rows, methods)]) + "\n"
    timing.publish("detect_ood", markdown, {"methods": methods, "sizes": sizes, "results": payload,
                                                  "ood_sets": {s: data.OOD_SETS[s] for s in sets},
                                                  "skipped": skipped}, out)
    roc_png(curves, Path(out) / "roc_ood.png", "Fashion-MNIST vs OOD (OOD = positive)")
    return payload


def eval_corruption(bundle=None, *, n: int = 300, n_fit: int = 1000, n_corrupt_fit: int = 300,
                    use_peers: bool = True, peers_python=None, out=timing.RESULTS, kinds=data.CORRUPTIONS,
                    levels=data.LEVELS, layer_grads: bool = True) -> dict:
    """Clean Fashion-MNIST eval images vs the same images corrupted, per type x level."""
    import gradprobe

    bundle = Path(bundle) if bundle else default_bundle(layer_grads)
    probe = gradprobe.load(bundle)
    ours = OurDetectors(probe, n_fit)
    eval_sets = {"clean": data.fmnist_part("eval", n)[0]}
    for kind in kinds:
        for level in levels:
            eval_sets[f"{kind}-{level}"] = data.corrupted_fmnist(kind, level, "eval", n)[0]
    results = {name: probe.run(images) for name, images in eval_sets.items()}
    peer, skipped = _peers_or_skip(bundle, eval_sets, data.fmnist_part("fit", n_fit), use_peers, peers_python)
    methods = [*ours.names(), *[p for p in PEERS if p in peer]]
    payload, curves, rows = {}, {}, []
    for kind in kinds:
        for level in levels:
            key = f"{kind}-{level}"
            supervised = ours.fit_supervised(probe.run(data.corrupted_fmnist(kind, level, "fit", n_corrupt_fit)[0]))
            in_scores, out_scores = ours.scores(results["clean"], supervised), ours.scores(results[key], supervised)
            for name in peer:
                in_scores[name], out_scores[name] = peer[name]["clean"], peer[name][key]
            per = {m: metrics(in_scores[m], out_scores[m]) for m in methods}
            payload[key] = per
            rows.append((f"FMNIST → {kind} L{level}", per))
            if level == 3:
                curves[f"{kind} L3"] = {m: (in_scores[m], out_scores[m]) for m in methods}
    sizes = {"eval_per_set": n, "in_dist_fit": n_fit, "corrupted_fit_per_set": n_corrupt_fit}
    by_level = []
    for metric in ("auroc", "fpr95"):
        lines = [f"### {HEADINGS[metric]} by corruption and level (methods slash-joined)",
                 "| type | " + " | ".join(f"L{lv}" for lv in levels) + " |", "|---|" + "---|" * len(levels)]
        for kind in kinds:
            lines.append(f"| {kind} | " + " | ".join(
                "/".join(f"{payload[f'{kind}-{lv}'][m][metric]:.1f}" for m in methods) for lv in levels) + " |")
        by_level.append("\n".join(lines))
    means = {m: {k: float(np.mean([payload[key][m][k] for key in payload])) for k in METRICS} for m in methods}
    markdown = "\n\n".join([
        "# Corrupted-input detection: clean vs corrupted Fashion-MNIST", _describe(bundle, probe, ours, sizes, skipped),
        "Cells list the methods in this order: " + " / ".join(methods) + ".",
        f"## Mean over all {len(payload)} type × level sets", long_table([("FMNIST → corrupted (mean)", means)], methods),
        *by_level, "## Every set, one row each", table(rows, methods)]) + "\n"
    timing.publish("detect_corruption", markdown, {"methods": methods, "sizes": sizes, "results": payload,
                                                         "mean": means, "skipped": skipped}, out)
    panels = list(curves.items())
    roc_png(dict(panels[:4]), Path(out) / "roc_corruption_a.png", "clean vs corrupted, level 3")
    if panels[4:]:
        roc_png(dict(panels[4:]), Path(out) / "roc_corruption_b.png", "clean vs corrupted, level 3")
    return payload


# ---------------------------------------------------------------------------------------------- CLI
def _add_arguments(parser, default_n: int) -> None:
    parser.add_argument("--bundle", default=None, help="default: the shipped model, exported into the cache")
    parser.add_argument("--n", type=int, default=default_n, help=f"eval images per set (default {default_n})")
    parser.add_argument("--no-peers", action="store_true", help="skip pytorch-ood (peers venv)")
    parser.add_argument("--peers-python", default=None, help=f"python of the peers venv (default ${peers.PEERS_ENV} "
                                                             "or .venv-peers/bin/python)")
    parser.add_argument("--layer-grads", action=argparse.BooleanOptionalAction, default=True,
                        help="default bundle with per-layer gradient norms (default on)")
    timing.add_output_arguments(parser)


def _check_n(n: int) -> None:
    if n < 10:
        raise InputError(f"--n must be at least 10, got {n}")


def _run_ood(args) -> int:
    _check_n(args.n)
    eval_ood(args.bundle, n_in=args.n, n_ood=min(args.n, 1000), use_peers=not args.no_peers,
             peers_python=args.peers_python, out=Path(args.out), layer_grads=args.layer_grads)
    return 0


def _run_corruption(args) -> int:
    _check_n(args.n)
    eval_corruption(args.bundle, n=args.n, use_peers=not args.no_peers, peers_python=args.peers_python,
                    out=Path(args.out), layer_grads=args.layer_grads)
    return 0


#: name -> (help, add_arguments, run): what ``gradprobe eval`` offers from this module.
EVALUATIONS = {
    "ood": ("Fashion-MNIST vs OOD sets: every registered detector beside pytorch-ood's",
            lambda parser: _add_arguments(parser, 2000), _run_ood),
    "corruption": ("clean vs corrupted Fashion-MNIST (8 types x 5 levels), the same detectors",
                   lambda parser: _add_arguments(parser, 300), _run_corruption),
}
