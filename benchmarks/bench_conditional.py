"""Class-conditional flows: samples per class, the conditional NLL, the generative classifier and
classifier-free guidance, on labelled 2-D sets and on Fashion-MNIST (14x14) at a small CPU budget.

Run by hand (not by CI), single-threaded:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conditional.py

(a) 2-D: flow matching (and a CNF) trained with the class labels of ``gmm-2d`` (three overlapping
anisotropic Gaussians: the class densities, hence the Bayes classifier, are exact) and ``moons``.
Reported: the conditional test NLL ``-log p(x | y)`` (exact trace) next to the exact one where it is
known, the generative classifier ``argmax_y log p(x | y) + log p(y)`` (prior: the training
frequencies) against the Bayes classifier, logistic regression and 15-nearest neighbours, and a
figure of samples per class at guidance weights 0, 1 and 3.

(b) Fashion-MNIST 14x14 (Debian's ``dataset-fashion-mnist``, 2x2-pooled): a class-conditional
U-Net trained by flow matching with label dropout 0.1, sampled at guidance weights
``w in {0, 1, 2, 4}`` (100 images per class, RK4): the Fréchet distance on the features of the
package's local classifier (*not* Inception FID) against the test images, and the local classifier's
agreement with the requested labels (the fraction of samples of class ``y`` it classifies as ``y``).
A grid per class at w = 1 and w = 4.

Writes ``benchmarks/results/conditional.{json,md}`` and PNGs into ``docs/images/``; runs and the
classifier cache go to ``--work`` (an interrupted run resumes). ``--quick``: a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

import iterflow  # noqa: E402
from iterflow.core.conditioning import conditioning  # noqa: E402
from iterflow.core.flow import Flow  # noqa: E402
from iterflow.core.guidance import guidance  # noqa: E402
from iterflow.data import GaussianMixture, get_dataset  # noqa: E402
from iterflow.evaluation.conditional import generative_classifier  # noqa: E402
from iterflow.evaluation.feature_classifier import (  # noqa: E402
    ClassifierConfig,
    classifier_accuracy,
    load_or_train_classifier,
    local_frechet_distance,
)
from iterflow.train import TrainConfig, load_run, train  # noqa: E402
from iterflow.viz import plot_image_grid  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_2D = (0.0, 1.0, 3.0)
WEIGHTS_IMAGES = (0.0, 1.0, 2.0, 4.0)


def overlap3() -> GaussianMixture:
    """Three overlapping anisotropic Gaussian classes (Bayes accuracy about 0.8): the class
    densities are exact, so are the Bayes classifier and the conditional entropy."""
    means = [[-1.2, 0.0], [1.2, 0.0], [0.0, 1.4]]
    covs = [[[0.8, 0.3], [0.3, 0.5]], [[0.5, -0.3], [-0.3, 0.8]], [[1.2, 0.0], [0.0, 0.25]]]
    return GaussianMixture(means, covs, weights=[0.3, 0.3, 0.4], name="overlap3")


#: (data set, method, settings of iterflow.fit); the data sets' labels condition the flows.
RUNS_2D: dict[str, tuple[Any, str, dict[str, Any]]] = {
    "overlap3 fm": (overlap3, "fm", dict(steps=3000, batch_size=512, lr=3e-3,
                                         hidden=(128, 128, 128))),
    "overlap3 cnf": (overlap3, "cnf", dict(steps=1500, batch_size=512, lr=5e-3,
                                           hidden=(64, 64, 64), activation="gelu",
                                           options={"steps": 8, "jacobian": 0.2})),
    "moons fm": (lambda: get_dataset("moons"), "fm", dict(steps=3000, batch_size=512, lr=3e-3,
                                                        hidden=(128, 128, 128))),
}  # fmt: skip
N_TRAIN, N_TEST = 20_000, 2000
IMAGES: dict[str, Any] = dict(
    method="fm", data="fashion-mnist-14", network="unet",
    net_options={"channels": 16, "channel_mult": [1, 2]}, steps=2500, batch_size=64, lr=2e-3,
    ema=0.995, n_train=20_000, n_val=100, n_test=1000,
)  # fmt: skip


def quick_settings(s: dict[str, Any]) -> dict[str, Any]:
    return {**s, "steps": 30, "n_train": 600, "n_test": 100}


def quick_2d(s: dict[str, Any]) -> dict[str, Any]:
    return {**s, "steps": 30}


# ------------------------------------------------------------------------------------------------
# (a) 2-D
# ------------------------------------------------------------------------------------------------


def baselines(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for name, clf in (
        ("logistic", LogisticRegression(max_iter=2000)),
        ("knn15", KNeighborsClassifier(15)),
    ):
        out[name] = float((clf.fit(train_x, train_y).predict(x) == y).mean())
    return out


def run_2d(
    label: str, run: tuple[Any, str, dict[str, Any]], work: Path, figures: Path, quick: bool
) -> dict[str, Any]:
    """Train ``iterflow.fit(method, x, labels=y)`` on the data set's labelled rows; evaluate."""
    make, method, settings = run
    settings = quick_2d(settings) if quick else settings
    ds = make()
    n_train, n_test = (600, 100) if quick else (N_TRAIN, N_TEST)
    args = (n_train, 1, n_test, 0)
    x_tr, x_te = ds.splits(*args).train, ds.splits(*args).test
    ytr, yte = ds.label_splits(*args).train, ds.label_splits(*args).test
    t0 = time.perf_counter()
    result = iterflow.fit(method, x_tr, labels=ytr, out=work / label.replace(" ", "_"),
                          n_val=500, seed=0, **settings)  # fmt: skip
    seconds = time.perf_counter() - t0
    flow, te = result.flow, x_te
    meta = json.loads((result.run_dir / "manifest.json").read_text())
    prior = meta["labels"]["class_counts"]
    t0 = time.perf_counter()
    res = generative_classifier(
        flow, te, yte, prior=prior, divergence="exact", solver="dopri5", atol=1e-5, rtol=1e-5
    )
    eval_seconds = time.perf_counter() - t0
    own = res.log_likelihoods.gather(1, yte[:, None])[:, 0]
    row: dict[str, Any] = {
        "run": label,
        "method": method,
        "data": ds.name,
        "classes": flow.num_classes,
        "steps": settings["steps"],
        "train_s": seconds,
        "eval_s": eval_seconds,
        "cond_nll": float(-own.mean()),
        "cond_nll_se": float(own.std() / math.sqrt(len(own))),
        "gen_acc": res.accuracy,
    }
    class_lp = getattr(ds, "class_log_prob", None)
    if class_lp is not None:  # exact class densities: the Bayes classifier and the exact NLL
        exact = class_lp(te.double())
        w = torch.tensor(prior, dtype=torch.float64)
        true_prior = getattr(ds, "weights", w / w.sum())
        row["exact_cond_nll"] = float(-exact.gather(1, yte[:, None])[:, 0].mean())
        bayes = (exact + true_prior.log()).argmax(1)
        row["bayes_acc"] = float((bayes == yte).double().mean())
        row["agree_bayes"] = float((bayes == res.predictions).double().mean())
    row.update(baselines(x_tr.numpy(), ytr.numpy(), te.numpy(), yte.numpy()))
    row["figure"] = plot_2d(flow, te, yte, label, figures)
    return row


def plot_2d(flow: Flow, x: torch.Tensor, y: torch.Tensor, label: str, figures: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = flow.num_classes
    colors = plt.get_cmap("tab10")(np.arange(k) % 10)
    fig, axes = plt.subplots(1, 1 + len(WEIGHTS_2D), figsize=(4 * (1 + len(WEIGHTS_2D)), 4))
    lo, hi = np.quantile(x.numpy(), [0.002, 0.998], axis=0)
    pad = 0.15 * (hi - lo)
    n = 400
    for ax in axes:
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    for c in range(k):
        xc = x[y == c][:n]
        axes[0].scatter(xc[:, 0], xc[:, 1], s=3, color=colors[c], alpha=0.6)
    axes[0].set_title("test data by class")
    for ax, w in zip(axes[1:], WEIGHTS_2D, strict=True):
        for c in range(k):
            g = torch.Generator().manual_seed(c)
            with torch.no_grad():
                s = flow.sample(n, generator=g, labels=c, guidance=w, solver="rk4", steps=32)
            ax.scatter(s[:, 0], s[:, 1], s=3, color=colors[c], alpha=0.6)
        name = {0.0: "unconditional", 1.0: "conditional"}.get(w, "guided")
        ax.set_title(f"samples per class, w = {w:g} ({name})")
    fig.suptitle(f"{label}: class-conditional flow (colour = requested class)")
    fig.tight_layout()
    path = figures / f"conditional_{label.split()[0]}_{label.split()[1]}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return shown(path)


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------
# (b) Fashion-MNIST
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def guided_images(flow: Flow, per_class: int, w: float, steps: int) -> tuple[torch.Tensor, ...]:
    """``per_class`` images of every class (class-major), decoded with guidance ``w``."""
    k = flow.num_classes
    y = torch.arange(k).repeat_interleave(per_class)
    z = torch.randn((len(y), *flow.event_shape), generator=torch.Generator().manual_seed(0))
    out = []
    for zc, yc in zip(z.split(250), y.split(250), strict=True):
        with conditioning(y=yc), guidance(w):
            out.append(flow.decode(zc, solver="rk4", steps=steps))
    return torch.cat(out), y


def run_images(
    work: Path, figures: Path, quick: bool, per_class: int, steps: int
) -> dict[str, Any]:
    settings = quick_settings(IMAGES) if quick else IMAGES
    cfg = TrainConfig.for_method(
        "fm", **{k: v for k, v in settings.items() if k != "method"}, labels=True, seed=0
    )
    folder = work / "fashion-mnist-14_fm"
    t0 = time.perf_counter()
    train(cfg, folder)
    train_s = time.perf_counter() - t0
    flow, cfg, meta = load_run(folder)
    ds = get_dataset(cfg.data)
    args = (cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    sp, lab = ds.splits(*args), ds.label_splits(*args)
    t0 = time.perf_counter()
    clf = load_or_train_classifier(
        sp.train, lab.train, cache_dir=work / "cache", name=cfg.data,
        config=ClassifierConfig(steps=30 if quick else 800), val_x=sp.test, val_y=lab.test,
    )  # fmt: skip
    clf_s = time.perf_counter() - t0
    q = ds.quantization
    rows = []
    for w in WEIGHTS_IMAGES:
        t0 = time.perf_counter()
        x, y = guided_images(flow, per_class, w, steps)
        seconds = time.perf_counter() - t0
        x = x.clamp(q.low, q.high)
        with torch.no_grad():
            agreement = classifier_accuracy(clf.net, x, y, "labels")
        rows.append({
            "w": w,
            "fd": local_frechet_distance(clf, x, sp.test),
            "label_agreement": agreement,
            "sample_s": seconds,
        })  # fmt: skip
        if w in (1.0, 4.0):
            grid = torch.cat([x[y == c][:8] for c in range(flow.num_classes)])
            path = figures / f"conditional_fmnist14_w{int(w)}.png"
            plot_image_grid(
                grid, path, nrow=8, value_range=(q.low, q.high),
                title=f"Fashion-MNIST 14x14, one class per row, guidance w = {w:g}",
            )  # fmt: skip
            rows[-1]["grid"] = shown(path)
    fd_test_train = local_frechet_distance(clf, sp.test, sp.train[: len(sp.test)])
    return {
        "data": cfg.data,
        "train_steps": cfg.steps,
        "train_s": train_s,
        "classifier_s": clf_s,
        "classifier": clf.info(),
        "label_dropout": cfg.label_dropout,
        "per_class": per_class,
        "sampler": f"rk4, {steps} steps",
        "fd_test_vs_train": fd_test_train,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def markdown(out: dict[str, Any], command: str) -> str:
    m = out["machine"]
    lines = [
        "# Class-conditional flows (benchmarks/bench_conditional.py)",
        "",
        f"`{command}`",
        "",
        f"Machine: {m['cpu']}, {m['threads']} thread(s), torch {m['torch']}. Timings were taken on "
        "a shared machine (other jobs ran at the same time): read them as rough costs.",
        "",
        "## (a) 2-D: conditional NLL and the generative classifier",
        "",
        f"Each flow is `iterflow.fit(method, x, labels=y)` on {out['n_train']} labelled points "
        "(label dropout 0.1; for moons the same as `iterflow train --data moons --labels`). "
        f"`cond_nll` is the mean of `-log p(x | y)` on {out['n_test']} test points (exact trace, "
        "dopri5), `exact_cond_nll` the same under the true class densities (overlap3: three "
        "overlapping Gaussian classes); `gen_acc` the accuracy of "
        "`argmax_y log p(x | y) + log p(y)`; `bayes_acc` that of the true posterior; "
        "`agree_bayes` the "
        "fraction of test points where the two classifiers agree; `logistic` and `knn15` "
        "scikit-learn baselines trained on the same labelled rows. Figures: samples per class "
        "at guidance weights 0 (the null label: unconditional), 1 (conditional) and 3 "
        "(`iterflow sample RUN --label y --guidance 3`).",
        "",
        table(
            out["2d"],
            [
                "run",
                "steps",
                "train_s",
                "cond_nll",
                "cond_nll_se",
                "exact_cond_nll",
                "gen_acc",
                "bayes_acc",
                "agree_bayes",
                "logistic",
                "knn15",
            ],
        ),  # fmt: skip
        "",
    ]
    for r in out["2d"]:
        lines.append(f"![{r['run']}](../../{r['figure']})")
    if "images" in out:
        im = out["images"]
        lines += [
            "",
            "## (b) Fashion-MNIST 14x14: FD against the guidance weight",
            "",
            f"Class-conditional U-Net (channels 16, mult 1,2), flow matching, {im['train_steps']} "
            f"steps of 64 images ({im['train_s']:.0f} s), label dropout {im['label_dropout']}; "
            f"{im['per_class']} samples per class ({im['sampler']}). `FD` is the Fréchet distance "
            "on the package's local classifier features (*not* Inception FID; test vs train "
            f"images: {im['fd_test_vs_train']:.3g}); `label agreement` the local classifier's "
            "accuracy on the samples against the requested classes (its test accuracy: "
            f"{im['classifier']['val_accuracy']:.3f}).",
            "",
            table(im["rows"], ["w", "fd", "label_agreement", "sample_s"]),
            "",
        ]
        for r in im["rows"]:
            if "grid" in r:
                lines.append(f"![w = {r['w']:g}](../../{r['grid']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_conditional")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "conditional")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps everywhere")
    ap.add_argument("--no-images", action="store_true", help="skip part (b)")
    ap.add_argument("--per-class", type=int, default=100, help="images per class and weight")
    ap.add_argument("--sample-steps", type=int, default=12, help="RK4 steps of the image sampler")
    a = ap.parse_args()
    work = a.work / "quick" if a.quick else a.work
    figures = work / "figures" if a.quick else ROOT / "docs" / "images"
    figures.mkdir(parents=True, exist_ok=True)
    n_train, n_test = (600, 100) if a.quick else (N_TRAIN, N_TEST)
    out: dict[str, Any] = {
        "machine": machine(), "quick": a.quick, "n_train": n_train, "n_test": n_test, "2d": []
    }  # fmt: skip
    for label, run in RUNS_2D.items():
        out["2d"].append(run_2d(label, run, work, figures, a.quick))
        print(json.dumps(out["2d"][-1]), flush=True)
    if not a.no_images:
        per_class = 4 if a.quick else a.per_class
        steps = 2 if a.quick else a.sample_steps
        out["images"] = run_images(work, figures, a.quick, per_class, steps)
        print(json.dumps(out["images"]), flush=True)
    stem = a.out.with_name(a.out.name + ("_quick" if a.quick else ""))
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conditional.py" + (
        " --quick" if a.quick else ""
    )
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(out, command))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
