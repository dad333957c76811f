"""Anomaly detection with a flow's log-density against five scikit-learn detectors.

Every detector is fitted on NORMAL training rows only and scores held-out normal and anomalous
rows; the anomaly score is minus the detector's ``score_samples`` (for the flow and the two
density models: ``-log p(x)``, low density = anomalous). Metrics: AUROC and average precision
(anomalies are the positive class; AP's chance level is the anomaly fraction of the test rows,
given with each table), from ``sklearn.metrics``.

Detectors (scikit-learn 1.9; ``score_samples`` of each):

* ``flow``: :class:`iterflow.FlowDensity`: flow matching with the minibatch-OT coupling (straight
  paths), the built-in SiLU MLP, batch 512, the method's default Adam, cosine schedule and EMA,
  float32 for speed. Its size is chosen like the GMM's and the KDE's hyperparameters, on normal
  rows only: two candidates (``FLOW_CANDIDATES``: two hidden layers of 128 for 500 steps, three
  of 256 for 1,200 steps) are trained on 80% of the normal training rows and the one with the
  higher mean log-likelihood on the other 20% is kept (no refit). While the recipe was set, on
  the first split / class of each data set, the large network overfitted the few hundred rows of
  breast cancer and digits badly (validation log-likelihood -100 against -15 nats) while
  Fashion-MNIST wanted it (-21 against -30): no one size suits all three. Scores: the log-density
  by :func:`iterflow.evaluation.score.score_rows` with the exact trace (autograd) and fixed-step
  ``rk4`` (8 steps; within 0.6 nats of dopri5 at 1e-5, correlation > 0.99999, on those cases).
  The exact trace avoids the noise of Hutchinson's estimator, which ``FlowDensity.score_samples``
  (``divergence="auto"``) uses above 16 dimensions.
* ``iforest``: ``IsolationForest()`` (defaults: 100 trees).
* ``lof``: ``LocalOutlierFactor(novelty=True)`` (20 neighbours).
* ``ocsvm``: ``OneClassSVM(nu=0.1, gamma="scale")`` (RBF kernel).
* ``gmm``: ``GaussianMixture`` with full covariances, the number of components in
  ``GMM_COMPONENTS`` chosen by BIC on the training rows.
* ``kde``: Gaussian ``KernelDensity`` with its bandwidth chosen by 5-fold ``GridSearchCV``
  (held-out log-likelihood) over ``KDE_BANDWIDTHS`` (17 values from 0.1 to 10, ratio 1.33; a
  grid twice as coarse cost the KDE up to 0.05 AUROC on digits: its AUROC is sensitive to the
  bandwidth).

Data (real, offline), preprocessed identically for every detector, fitted on the normal training
rows only:

* ``breast_cancer`` (``sklearn.datasets.load_breast_cancer``, 30 features): benign = normal,
  malignant = anomaly. Benign rows split 60/40 into training and test; the test adds all 212
  malignant rows. Standardised. Spread: ``--seeds`` random splits (flows seeded alike).
* ``digits`` (``load_digits``, 8x8, 1,797 images): each class in turn is the anomaly, the other nine
  normal (70/30 split of the normal rows; the test adds every image of the held-out class). Pixels
  projected on their first ``--pca`` principal components, then standardised (whitened). Spread:
  the ten classes.
* ``fashion`` (Fashion-MNIST from Debian's ``dataset-fashion-mnist``, read by
  :func:`iterflow.data.images.fashion_mnist`; skipped with a message when absent): each class in
  turn is the anomaly; ``--fashion-train`` normal training images drawn from the official training
  set, and a test of the official test set at its natural 9:1 ratio (``--fashion-test`` rows).
  PCA to ``--pca`` components, whitened. Spread: the ten classes.

The flow's recipe is the same for every case; all seeds are fixed. The full run took 702 s of
process CPU time at one thread (25 min wall on a 2-core AMD EPYC shared with other jobs; Nov 2026,
``benchmarks/results/anomaly.{json,md}``), two thirds of it in the flow.

Findings of that run (AUROC, mean over cases): the flow beats isolation forest and the one-class
SVM nearly everywhere (digits 0.953 against 0.825 / 0.871, every class), but not the tuned
classical density models on small data: breast cancer 0.945 (all five detectors 0.949-0.962),
digits 0.953 against KDE 0.975 and GMM 0.970. On Fashion-MNIST (PCA 32) it is third, 0.675,
behind LOF 0.732 and KDE 0.680 and ahead of the GMM 0.648. Both likelihood models fail on
"sneaker" held out (flow 0.34, GMM 0.22: below chance, the simpler images get the higher density,
as Nalisnick et al. 2019 found for deep generative models), which LOF does not (0.66).

Run (by hand, not by CI)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_anomaly.py \\
        --out benchmarks/results/anomaly.json          # also writes anomaly.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_anomaly.py --quick   # smoke run

``--quick`` uses a few classes, small training sets and a short flow training (numbers not
meaningful).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import OneClassSVM

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from iterflow import FlowDensity  # noqa: E402
from iterflow.errors import InputError  # noqa: E402
from iterflow.evaluation.score import score_rows  # noqa: E402

DETECTORS = ("flow", "iforest", "lof", "ocsvm", "gmm", "kde")
GMM_COMPONENTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
KDE_BANDWIDTHS = tuple(float(b) for b in np.geomspace(0.1, 10.0, 17))
FLOW_CANDIDATES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((128, 128), 500),
    ((256, 256, 256), 1200),
)
NAMES = {"auroc": "AUROC", "ap": "AP"}


@dataclass(frozen=True)
class FlowRecipe:
    """The flow's training and scoring settings (see the module docstring).

    Attributes:
        candidates: ``(hidden layers, training steps)`` of the networks tried; with more than one,
            each is trained on ``1 - val_fraction`` of the normal training rows and the one with
            the highest mean log-likelihood on the rest is kept (no refit); with one, it is
            trained on all of them.
    """

    candidates: tuple[tuple[tuple[int, ...], int], ...] = FLOW_CANDIDATES
    val_fraction: float = 0.2
    batch_size: int = 512
    coupling: str = "ot"
    dtype: str = "float32"
    solver: str = "rk4"
    solver_steps: int = 8


def flow_scores(
    x_train: np.ndarray, x_test: np.ndarray, seed: int, recipe: FlowRecipe
) -> tuple[np.ndarray, dict[str, Any]]:
    """Flow log-densities of ``x_test`` (nats) after fitting on ``x_train`` (see
    :class:`FlowRecipe`), and the chosen network with its validation log-likelihood."""

    def log_density(model: FlowDensity, x: np.ndarray) -> np.ndarray:
        spec = {"solver": recipe.solver, "steps": recipe.solver_steps}
        return score_rows(model.flow_, x, divergence="exact", **spec).values.numpy()

    def train(hidden: tuple[int, ...], steps: int, x: np.ndarray) -> FlowDensity:
        return FlowDensity(
            "fm",
            steps=steps,
            hidden=hidden,
            batch_size=recipe.batch_size,
            options={"coupling": recipe.coupling},
            dtype=recipe.dtype,
            random_state=seed,
        ).fit(x)

    if len(recipe.candidates) == 1:
        (hidden, steps), val = recipe.candidates[0], None
        model = train(hidden, steps, x_train)
    else:
        fit_rows, val_rows = train_test_split(
            x_train, test_size=recipe.val_fraction, random_state=seed
        )
        tried = []
        for hidden, steps in recipe.candidates:
            m = train(hidden, steps, fit_rows)
            tried.append((float(log_density(m, val_rows).mean()), hidden, steps, m))
        val, hidden, steps, model = max(tried, key=lambda t: t[0])
    info = {"hidden": list(hidden), "steps": steps, "val_log_likelihood": val}
    return log_density(model, x_test), info


def fit_scores(
    name: str, x_train: np.ndarray, x_test: np.ndarray, seed: int, recipe: FlowRecipe
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit detector ``name`` on ``x_train`` (normal rows) and score ``x_test``.

    Returns:
        ``(scores, info)``: ``(n_test,)`` normality scores (higher = more normal; for the density
        models the log-density in nats) and the chosen hyperparameters.
    """
    info: dict[str, Any] = {}
    if name == "flow":
        return flow_scores(x_train, x_test, seed, recipe)
    if name == "iforest":
        est: Any = IsolationForest(random_state=seed).fit(x_train)
    elif name == "lof":
        est = LocalOutlierFactor(novelty=True).fit(x_train)
    elif name == "ocsvm":
        est = OneClassSVM(nu=0.1, gamma="scale").fit(x_train)
    elif name == "gmm":
        fits = [
            GaussianMixture(k, covariance_type="full", random_state=seed).fit(x_train)
            for k in GMM_COMPONENTS
            if k <= x_train.shape[0] // 2
        ]
        est = min(fits, key=lambda g: g.bic(x_train))
        info["components"] = int(est.n_components)
    elif name == "kde":
        folds = min(5, x_train.shape[0])
        search = GridSearchCV(KernelDensity(), {"bandwidth": list(KDE_BANDWIDTHS)}, cv=folds)
        est = search.fit(x_train).best_estimator_
        info["bandwidth"] = float(est.bandwidth)
    else:
        raise ValueError(f"unknown detector {name!r}")
    return np.asarray(est.score_samples(x_test), dtype=np.float64), info


def evaluate_case(
    x_train: np.ndarray,
    x_test: np.ndarray,
    is_anomaly: np.ndarray,
    *,
    seed: int = 0,
    recipe: FlowRecipe | None = None,
    detectors: tuple[str, ...] = DETECTORS,
) -> dict[str, dict[str, Any]]:
    """AUROC and AP of every detector on one case (rows already preprocessed).

    Arguments:
        x_train: ``(n, d)`` normal training rows; x_test: ``(m, d)`` test rows.
        is_anomaly: ``(m,)`` booleans, the positive class of both metrics.
        seed: seed of the randomised detectors (flow, isolation forest, mixture).
        recipe: the flow's settings (default :class:`FlowRecipe`).
        detectors: names in :data:`DETECTORS`.

    Returns:
        detector -> ``{"auroc", "ap", "seconds", **hyperparameters}``.
    """
    recipe = recipe or FlowRecipe()
    y = np.asarray(is_anomaly, dtype=bool)
    out = {}
    for name in detectors:
        t0 = time.perf_counter()
        scores, info = fit_scores(name, x_train, x_test, seed, recipe)
        if not np.all(np.isfinite(scores)):  # -inf log-densities: the most anomalous
            scores = np.nan_to_num(scores, nan=-np.inf, neginf=-1e300, posinf=1e300)
        out[name] = {
            "auroc": float(roc_auc_score(y, -scores)),
            "ap": float(average_precision_score(y, -scores)),
            "seconds": time.perf_counter() - t0,
            **info,
        }
    return out


@dataclass(frozen=True)
class Case:
    """One anomaly-detection problem: preprocessed normal training rows and a labelled test."""

    data: str
    label: str
    x_train: np.ndarray
    x_test: np.ndarray
    is_anomaly: np.ndarray
    seed: int


def preprocess(x_train: np.ndarray, x_test: np.ndarray, pca: int | None) -> tuple[Any, Any]:
    """Standardise (after a PCA to ``pca`` components when given), fitted on ``x_train``."""
    steps: list[Any] = [] if pca is None else [PCA(min(pca, *x_train.shape), random_state=0)]
    pipe = make_pipeline(*steps, StandardScaler()).fit(x_train)
    return pipe.transform(x_train), pipe.transform(x_test)


def held_out_class(
    data: str,
    x_normal_train: np.ndarray,
    x_test: np.ndarray,
    is_anomaly: np.ndarray,
    label: str,
    pca: int | None,
    seed: int,
) -> Case:
    a, b = preprocess(x_normal_train, x_test, pca)
    return Case(data, label, a, b, is_anomaly, seed)


def breast_cancer_cases(seeds: list[int]) -> Iterator[Case]:
    x, y = load_breast_cancer(return_X_y=True)  # target 1 = benign
    normal, anomalous = x[y == 1], x[y == 0]
    for seed in seeds:
        tr, te = train_test_split(normal, train_size=0.6, random_state=seed)
        test = np.concatenate([te, anomalous])
        flag = np.r_[np.zeros(len(te), bool), np.ones(len(anomalous), bool)]
        yield held_out_class("breast_cancer", tr, test, flag, f"seed {seed}", None, seed)


def digits_cases(classes: list[int], pca: int) -> Iterator[Case]:
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    for k in classes:
        tr, te = train_test_split(x[y != k], train_size=0.7, random_state=0, stratify=y[y != k])
        test = np.concatenate([te, x[y == k]])
        flag = np.r_[np.zeros(len(te), bool), np.ones(int((y == k).sum()), bool)]
        yield held_out_class("digits", tr, test, flag, f"class {k}", pca, 0)


def fashion_cases(classes: list[int], pca: int, n_train: int, n_test: int) -> Iterator[Case]:
    """Fashion-MNIST cases; the files are read at once (``InputError`` when they are absent)."""
    from iterflow.data.images import fashion_mnist

    ds = fashion_mnist()
    assert ds.labels is not None and ds.test_images is not None and ds.test_labels is not None
    x = ds.images.reshape(ds.n_rows, -1).numpy() / 255.0
    y = ds.labels.numpy()
    xt = ds.test_images.reshape(ds.test_images.shape[0], -1).numpy() / 255.0
    yt = ds.test_labels.numpy()
    names = ds.class_names or tuple(str(k) for k in range(10))
    n_anom = n_test // 10  # the natural 9:1 ratio of ten balanced classes

    def case(k: int) -> Case:
        rng = np.random.default_rng(k)
        tr = x[rng.choice(np.flatnonzero(y != k), n_train, replace=False)]
        te_n = rng.choice(np.flatnonzero(yt != k), n_test - n_anom, replace=False)
        te_a = rng.choice(np.flatnonzero(yt == k), n_anom, replace=False)
        flag = np.r_[np.zeros(len(te_n), bool), np.ones(n_anom, bool)]
        label = f"class {k} ({names[k]})"
        return held_out_class("fashion", tr, xt[np.r_[te_n, te_a]], flag, label, pca, 0)

    return (case(k) for k in classes)


def summarise(rows: list[dict[str, Any]], detectors: tuple[str, ...]) -> dict[str, Any]:
    """Mean and standard deviation (over cases) of each detector's AUROC and AP, and the flow's
    paired wins: the cases where its metric exceeds each baseline's."""
    out: dict[str, Any] = {"cases": len(rows)}
    for metric in ("auroc", "ap"):
        for d in detectors:
            v = np.array([r["results"][d][metric] for r in rows])
            out[f"{d}_{metric}_mean"] = float(v.mean())
            out[f"{d}_{metric}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            if d != "flow" and "flow" in detectors:
                f = np.array([r["results"]["flow"][metric] for r in rows])
                out[f"flow_beats_{d}_{metric}"] = int((f > v).sum())
    out["prevalence"] = float(np.mean([r["prevalence"] for r in rows]))
    if "flow" in detectors and all("hidden" in r["results"]["flow"] for r in rows):
        sizes = [
            f"{r['results']['flow']['hidden']} for {r['results']['flow']['steps']} steps"
            for r in rows
        ]
        out["flow_sizes"] = {k: sizes.count(k) for k in sorted(set(sizes))}
    return out


def markdown(summary: dict[str, dict[str, Any]], detectors: tuple[str, ...]) -> str:
    """One table per data set (mean ± std over cases, best mean in bold), then the wins lines."""
    lines: list[str] = []
    for data, s in summary.items():
        spread = "seeds" if data == "breast_cancer" else "held-out classes"
        lines += [
            f"### {data}: mean ± std over {s['cases']} {spread}; anomaly fraction of the test "
            f"rows {s['prevalence']:.2f} (AP's chance level)",
            "",
        ]
        lines += ["| metric | " + " | ".join(detectors) + " |", "|---" * (len(detectors) + 1) + "|"]
        for metric in ("auroc", "ap"):
            best = max(detectors, key=lambda d: s[f"{d}_{metric}_mean"])
            cells = []
            for d in detectors:
                c = f"{s[f'{d}_{metric}_mean']:.3f} ± {s[f'{d}_{metric}_std']:.3f}"
                cells.append(f"**{c}**" if d == best else c)
            lines.append(f"| {NAMES[metric]} | " + " | ".join(cells) + " |")
        if "flow_sizes" in s:
            chosen = "; ".join(f"{k}: {n}" for k, n in s["flow_sizes"].items())
            lines += [
                "",
                f"Flow networks (hidden layers) chosen by validation likelihood, cases: {chosen}.",
            ]
        lines.append("")
    lines += ["### wins", "", *wins(summary, detectors)]
    return "\n".join(lines)


def wins(summary: dict[str, dict[str, Any]], detectors: tuple[str, ...]) -> list[str]:
    """Where the flow has the best mean, and per baseline on how many cases it is ahead."""
    if "flow" not in detectors:
        return []
    out = []
    for data, s in summary.items():
        for metric in ("auroc", "ap"):
            ranked = sorted(detectors, key=lambda d: -s[f"{d}_{metric}_mean"])
            rank = ranked.index("flow") + 1
            verdict = (
                "flow best" if rank == 1 else f"flow {rank}/{len(detectors)}, best {ranked[0]}"
            )
            paired = ", ".join(
                f"{d} {s[f'flow_beats_{d}_{metric}']}/{s['cases']}"
                for d in detectors
                if d != "flow"
            )
            out.append(f"- {data} {metric}: {verdict}; flow ahead of: {paired}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="breast_cancer,digits,fashion")
    ap.add_argument("--seeds", type=int, default=5, help="breast-cancer splits")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="held-out image classes")
    ap.add_argument("--pca", type=int, default=32, help="principal components of the images")
    ap.add_argument("--fashion-train", type=int, default=4000)
    ap.add_argument("--fashion-test", type=int, default=1000)
    ap.add_argument("--step-scale", type=float, default=1.0, help="multiplies the flow's steps")
    ap.add_argument("--quick", action="store_true", help="tiny budgets (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="JSON here, the table as .md beside it")
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    scaled = tuple((h, max(1, round(args.step_scale * k))) for h, k in FLOW_CANDIDATES)
    recipe = FlowRecipe(candidates=scaled)
    classes = [int(k) for k in args.classes.split(",") if k.strip()]
    seeds = list(range(args.seeds))
    if args.quick:
        recipe = replace(recipe, candidates=(((32, 32), 60), ((64, 64), 100)))
        classes, seeds = [0, 1], [0, 1]
        args.fashion_train, args.fashion_test = 1000, 500
    makers = {
        "breast_cancer": lambda: breast_cancer_cases(seeds),
        "digits": lambda: digits_cases(classes, args.pca),
        "fashion": lambda: fashion_cases(classes, args.pca, args.fashion_train, args.fashion_test),
    }
    t_start, cpu_start = time.perf_counter(), time.process_time()
    rows: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for data in (d.strip() for d in args.data.split(",") if d.strip()):
        try:
            cases = makers[data]()
        except InputError as e:  # the Fashion-MNIST files are absent
            skipped[data] = str(e)
            print(f"skipping {data}: {e}", flush=True)
            continue
        for case in cases:
            res = evaluate_case(
                case.x_train, case.x_test, case.is_anomaly, seed=case.seed, recipe=recipe
            )
            rows.setdefault(data, []).append(
                {
                    "case": case.label,
                    "n_train": len(case.x_train),
                    "n_test": len(case.x_test),
                    "dim": case.x_train.shape[1],
                    "prevalence": float(case.is_anomaly.mean()),
                    "results": res,
                }
            )
            line = " ".join(f"{d} {r['auroc']:.3f}" for d, r in res.items())
            elapsed = time.perf_counter() - t_start
            print(f"{data} {case.label}: AUROC {line} ({elapsed:.0f} s)", flush=True)
    total, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    summary = {data: summarise(r, DETECTORS) for data, r in rows.items()}
    info = {**machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    md = markdown(summary, DETECTORS)
    clock = f"total {total:.0f} s wall, {cpu:.0f} s CPU (process)"
    print(f"\nMachine: {info}; {clock}\n\n{md}")
    if args.out is not None:
        write_json(
            str(args.out),
            {
                "machine": info,
                "seconds": total,
                "cpu_seconds": cpu,
                "quick": args.quick,
                "flow_recipe": asdict(recipe),
                "gmm_components": GMM_COMPONENTS,
                "kde_bandwidths": KDE_BANDWIDTHS,
                "summary": summary,
                "cases": rows,
                "skipped": skipped,
                "finite": all(
                    math.isfinite(v)
                    for s in summary.values()
                    for v in s.values()
                    if isinstance(v, float)
                ),
            },
        )
        header = f"Machine: {info}; {clock}; command: {' '.join(sys.argv)}\n\n"
        skip = "".join(f"\nskipped {d}: {why}\n" for d, why in skipped.items())
        args.out.with_suffix(".md").write_text(header + md + "\n" + skip)
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
