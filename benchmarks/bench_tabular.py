"""A real table large enough to rank methods (issue 15, item 5): Fashion-MNIST on its first 32
principal components, 60,000 training and 10,000 test rows; flow matching, the end-to-end CNF,
JKO-flow and local flow matching at equal wall-clock budget, with a full-covariance Gaussian as
the reference.

Data. The 60,000 training images (pixels / 255) fix a PCA (scikit-learn, 32 components); the
training and the 10,000 official test images are projected on it and standardised by the training
scores' standard deviations (the PCA's whitening). No dequantisation: the projections of the 8-bit
images onto 32 directions have no atoms that matter at this scale. Densities are in these
standardised units; NLL per dimension = NLL / 32.

Training. Each method runs its recommended settings (``TrainConfig.for_method``; flow matching with
Gaussian noise of standard deviation 0.05 around its paths, ``FM_TABLE_OPTIONS``, see below), or a
preset per method (``--config M=NAME``), on the 60,000 rows (2,000 of them as the trainer's validation
particles, as :func:`iterflow.fit` does), with its steps per stage scaled to fill ``--budget``
seconds (``bench_anytime.fill_config``) and capped at the budget; the model is that of the last
checkpoint (``bench_anytime.checkpoint_flow``). Evaluation: exact trace, dopri5 at ``--tol``,
float64, on all 10,000 test rows; the NLL per dimension with its standard error over the rows, and
for every pair of methods the mean per-row difference with its paired standard error (the rows'
own spread cancels: this, not the two standard errors, decides the ranking). The solver's error is
bounded by recomputing one model's NLL (``--tol-check``, JKO-flow by default) at ``tol / 100`` on
``--tol-check-n`` rows.

Next to the mean, the report gives each model's median NLL per dimension and the number of test
rows above 5 nats per dimension: a flow-matching model trained for many epochs on straight paths
without noise put almost no density on a few test rows (one ordinary row, median distance to its
nearest training row, cost 6.6e5 nats per dimension after 62,937 steps: near the data end the
exact velocity of the empirical measure grows like 1/s, and the network learns to follow it), and
those rows then dominated its mean and its standard error. Noise of standard deviation sigma
around the paths (``FMOptions.sigma``) keeps the velocity at s = 0 bounded (it becomes a posterior
mean instead of ``(x - x_i) / s``); with sigma = 0.05 (in the whitened units) no test row exceeds
5 nats per dimension. ``--overrides fm:options.sigma=0`` trains without it.

Outputs: ``benchmarks/results/tabular_fmnist32.json``, ``.md`` and ``_rows.npz`` (every model's
per-row test NLL).

Usage::

    python benchmarks/bench_tabular.py --budget 600 --threads 2
    OMP_NUM_THREADS=1 python benchmarks/bench_tabular.py --budget 60 --threads 1   # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_anytime import (  # noqa: E402
    CLOCK_HELP,
    CLOCKS,
    LABELS,
    ROOT,
    apply_overrides,
    checkpoint_flow,
    mean_se,
    nll_rows,
    paired_difference,
    preset_config,
    run_method,
    tol_check,
)
from common import machine, write_json  # noqa: E402

from iterflow.train import TrainConfig, TrainData  # noqa: E402

DIM = 32
#: Flow matching's options on this table (over its recommended ones): path noise 0.05.
FM_TABLE_OPTIONS = {"sigma": 0.05}
DATA_NAME = "fashion-mnist-pca32"
TAIL_NATS_PER_DIM = 5.0  # "far" test rows: NLL above 5 nats per dimension (the Gaussian's: ~1.4)


def pca_tables(
    train_images: np.ndarray, test_images: np.ndarray, dim: int = DIM, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Training and test rows: the images (flattened, / 255) projected on the first ``dim``
    principal components of the training images, standardised by the training scores."""
    from sklearn.decomposition import PCA

    a = train_images.reshape(len(train_images), -1).astype(np.float64) / 255.0
    b = test_images.reshape(len(test_images), -1).astype(np.float64) / 255.0
    pca = PCA(n_components=dim, whiten=True, random_state=seed).fit(a)
    return pca.transform(a), pca.transform(b)


def gaussian_rows(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-row NLL (nats) of the test rows under the full-covariance Gaussian fitted (maximum
    likelihood) to the training rows."""
    from scipy.stats import multivariate_normal

    mean, cov = train.mean(0), np.cov(train, rowvar=False, bias=True)
    return -multivariate_normal(mean, cov).logpdf(test)


def tail_figures(
    rows: np.ndarray, dim: int = DIM, far: float = TAIL_NATS_PER_DIM
) -> dict[str, Any]:
    """Figures of a model's per-row NLL (nats) that a few extreme rows cannot move: the median per
    dimension, the largest row per dimension, and how many rows exceed ``far`` nats per dimension
    (a model that puts almost no density on some test rows, e.g. one that memorised its training
    rows, has a mean far above its median).

    Example:
        >>> tail_figures(np.array([32.0, 64.0, 3200.0]), dim=32, far=50.0)["rows_far"]
        1
    """
    per_dim = np.asarray(rows, dtype=np.float64) / dim
    return {"median_per_dim": float(np.median(per_dim)), "max_per_dim": float(per_dim.max()),
            "rows_far": int((per_dim > far).sum())}  # fmt: skip


def ranking(rows: dict[str, np.ndarray], dim: int) -> list[dict[str, Any]]:
    """Every pair (better first, by mean NLL): the per-row difference per dimension and its
    paired standard error, and whether the difference exceeds two standard errors."""
    order = sorted(rows, key=lambda k: float(np.mean(rows[k])))
    out = []
    for a, b in itertools.combinations(order, 2):
        d, se = paired_difference(rows[b], rows[a])
        out.append({"better": a, "worse": b, "diff_per_dim": d / dim, "se_per_dim": se / dim,
                    "z": d / se if se > 0 else math.inf, "resolved": d > 2 * se})  # fmt: skip
    return out


def markdown(result: dict[str, Any]) -> str:
    """The ``tabular_fmnist32.md`` report."""
    lines = [
        "# Fashion-MNIST, 32 principal components (standardised): test NLL per dimension", "",
        f"Budget {result['budget']:g} s per method, {result['threads']} thread(s), "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores); "
        f"{result['n_train']} training rows, {result['n_test']} test rows; exact trace, dopri5 "
        f"at {result['tol']:g}, float64.", "",
        "| model | NLL per dim | ± se | total NLL | median per dim | rows > "
        f"{TAIL_NATS_PER_DIM:g} per dim | train s | wall s | CPU s | steps x stages |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in sorted(result["models"].items(), key=lambda kv: kv[1]["nll_per_dim"]):
        median = f"{r['median_per_dim']:.4f}" if "median_per_dim" in r else "—"
        lines.append(
            f"| {LABELS.get(name, name)} | {r['nll_per_dim']:.4f} | {r['se_per_dim']:.4f} | "
            f"{r['nll']:.2f} | {median} | {r.get('rows_far', '—')} | {r.get('train_s', 0):.1f} | "
            f"{r.get('wall_s', 0):.1f} | {r.get('cpu_s', 0):.1f} | {r.get('steps', '')} |"
        )
    lines += ["", "Paired comparisons (per-row difference of the worse minus the better, per "
              "dimension, ± its standard error over the test rows):", "",
              "| better | worse | difference per dim | ± paired se | z | resolved (> 2 se) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for p in result["ranking"]:
        lines.append(
            f"| {LABELS.get(p['better'], p['better'])} | {LABELS.get(p['worse'], p['worse'])} | "
            f"{p['diff_per_dim']:.4f} | {p['se_per_dim']:.4f} | {p['z']:.1f} | "
            f"{'yes' if p['resolved'] else 'no'} |"
        )
    tc = result.get("tol_check")
    if tc:
        lines += ["", f"Solver check ({tc['model']}, {tc['rows']} rows): |NLL(tol) - "
                  f"NLL(tol/100)| = {tc['abs_diff']:.2e} nats."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--methods", default=",".join(("fm", "cnf", "jko", "local-fm")))
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=PRESET")
    ap.add_argument("--fill", choices=("auto", "steps", "none"), default="auto")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--clock", choices=CLOCKS, default="train", help=CLOCK_HELP)
    ap.add_argument(
        "--tol-check",
        default="jko",
        help="model whose NLL is recomputed at tol / 100 (absent: the best one)",
    )
    ap.add_argument("--tol-check-n", type=int, default=1000)
    ap.add_argument("--n-train", type=int, default=60_000, help="training rows used (tests)")
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overrides", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tabular_fmnist32"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--reevaluate",
        default=None,
        metavar="JSON",
        help="re-evaluate the models of a finished run of this script (its JSON; its run folders "
        "in --workdir) without training: the per-row NLLs and the report, training figures kept",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from iterflow.data.images import fashion_mnist

    ds = fashion_mnist()
    train_np, test_np = pca_tables(ds.images.numpy(), ds.test_images.numpy(), DIM, args.seed)
    train_np, test_np = train_np[: args.n_train], test_np[: args.n_test]
    train = torch.from_numpy(train_np).float()
    test = torch.from_numpy(test_np)
    g = torch.Generator().manual_seed(args.seed)
    val = train[torch.randperm(len(train), generator=g)[:2000]]
    desc = {"name": DATA_NAME, "source": "fashion-mnist (PCA 32, whitened)", "dim": DIM,
            "event_shape": [DIM], "finite": True, "has_log_prob": False,
            "n_rows": len(train), "dtype": "float32"}  # fmt: skip
    data = TrainData(train, val, desc)
    presets = dict(item.split("=", 1) for item in args.config)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tabular_"))
    rows: dict[str, np.ndarray] = {"gaussian": gaussian_rows(train_np, test_np)}
    models: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    if args.reevaluate:
        if args.workdir is None:
            raise SystemExit("--reevaluate needs --workdir: the folder holding the runs")
        before = json.loads(Path(args.reevaluate).read_text())
        for method, run in before["runs"].items():
            cfg = TrainConfig.from_json(run["config"])
            print(f"[{DATA_NAME}] {method}: re-evaluating {work / method}", flush=True)
            t0 = time.perf_counter()
            flow = checkpoint_flow(work / method, cfg, (DIM,))
            rows[method], nfe = nll_rows(flow, test, args.tol, args.seed)
            models[method] = {**before["models"][method], "nfe": nfe,
                              "eval_s": time.perf_counter() - t0}  # fmt: skip
            runs[method] = run
    for method in [m for m in args.methods.split(",") if m and not args.reevaluate]:
        if method in presets:
            cfg = preset_config(presets[method], method)
        else:
            cfg = TrainConfig.for_method(method, seed=args.seed)
        cfg = dataclasses.replace(cfg, data=DATA_NAME, n_train=len(train), n_val=len(val))
        if method == "fm" and method not in presets:
            cfg = dataclasses.replace(cfg, options={**cfg.options, **FM_TABLE_OPTIONS})
        cfg = apply_overrides(cfg, method, args.overrides)
        fill = args.fill == "steps" or (args.fill == "auto" and method not in presets)
        print(f"[{DATA_NAME}] {method}: budget {args.budget:g} s", flush=True)
        res = run_method(cfg, data, test, work / method, args.budget, [args.budget], args.tol,
                         fill, check_tol=False, clock=args.clock)  # fmt: skip
        last = res["checkpoints"][-1]
        rows[method] = last.pop("rows")
        for c in res["checkpoints"]:
            c.pop("rows", None)
        models[method] = {k: last[k] for k in ("train_s", "wall_s", "cpu_s", "nfe", "eval_s")}
        models[method]["steps"] = f"{res['config']['steps']} x {(res['fill'] or {}).get('stages')}"
        runs[method] = res
    for name, r in rows.items():
        value, se = mean_se(r)
        models.setdefault(name, {}).update(nll=value, se=se, nll_per_dim=value / DIM,
                                           se_per_dim=se / DIM, **tail_figures(r))  # fmt: skip
    result: dict[str, Any] = {
        "machine": machine(), "budget": args.budget, "clock": args.clock,
        "threads": args.threads, "tol": args.tol,
        "n_train": len(train), "n_test": len(test), "dim": DIM, "models": models,
        "ranking": ranking(rows, DIM), "runs": runs, "load": os.getloadavg(),
    }  # fmt: skip
    if args.reevaluate:  # the training figures are the finished run's; the evaluation is this one's
        result.update({k: before[k] for k in ("budget", "clock", "threads", "load")},
                      eval_threads=args.threads, reevaluated_load=os.getloadavg())  # fmt: skip
    learned = [m for m in runs if math.isfinite(models[m]["nll"])]
    if learned and args.tol_check_n > 0:
        best = (
            args.tol_check
            if args.tol_check in learned
            else min(learned, key=lambda m: models[m]["nll"])
        )
        cfg = TrainConfig.from_json(runs[best]["config"])
        flow = checkpoint_flow(work / best, cfg, (DIM,))
        check = tol_check(flow, test[: args.tol_check_n], args.tol, args.seed)
        result["tol_check"] = {"model": best, "rows": args.tol_check_n, **check}
    write_json(args.out + ".json", result)
    np.savez_compressed(
        args.out + "_rows.npz", **{k: v.astype(np.float64) for k, v in rows.items()}
    )
    md = markdown(result)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
