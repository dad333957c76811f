"""Benchmark: flow-based optimal transport and telescopic density-ratio estimation.

Pairs of Gaussian mixtures with well-separated supports in d = 2, 10 and 20 (exact log densities
from :class:`iterflow.data.GaussianMixture`). For each pair it fits the transport flow
(:func:`iterflow.apps.ot.fit_transport`) and three estimators of ``log q(x)/p(x)`` on the
same training samples:

* ``telescopic``: classifiers between consecutive distributions along the flow
  (:func:`iterflow.apps.ot.fit_telescopic`);
* ``classifier``: one logistic classifier on P vs Q, same network and number of steps;
* ``kde``: two Gaussian KDEs with cross-validated bandwidths (scikit-learn).

It reports the mean squared error of each estimate against the exact log ratio on held-out
points from P and from Q, the flow's W2^2 estimate (kinetic energy) against POT's exact W2^2
between the held-out samples in 2-D, and, on a pair of Gaussians, the flow's W2^2 against the
closed form.

Random Gaussian pairs in 5, 10 and 20 dimensions (``--gauss-dims``; means ``N(0, I)``, covariances
``R diag(e^u) R^T`` with ``R`` a random rotation and ``u ~ U(-1, 1)``): the flow's W2^2 at the
default options against the Bures-Wasserstein closed form (and against the closed form between the
training samples' own Gaussian fits, which removes the sampling error of P and Q), the map's RMSE
against the closed-form linear OT map on held-out points, and the three log-ratio estimators.

Run by hand (not by CI), e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_transport_ratio.py \
        --out benchmarks/results/transport_ratio.json

``--dims 2,10`` restricts the dimensions; ``--quick`` shortens every training for a smoke test (its
numbers are not meaningful).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from iterflow.apps.ot import (  # noqa: E402
    ClassifierOptions,
    KDEOptions,
    TelescopicOptions,
    TransportOptions,
    fit_classifier,
    fit_kde,
    fit_telescopic,
    fit_transport,
    gaussian_ot_map,
    gaussian_w2_sq,
    log_ratio_mse,
)
from iterflow.data import GaussianMixture  # noqa: E402
from iterflow.metrics import w2  # noqa: E402


def mixture_pair(
    d: int, seed: int, separation: float = 3.0
) -> tuple[GaussianMixture, GaussianMixture]:
    """P: two components (std 0.5) around ``-separation e_1``; Q: two (stds 0.4, 0.7) around
    ``+separation e_1``; component means jittered by ``N(0, 0.8^2 I)`` in every dimension."""
    g = torch.Generator().manual_seed(seed)
    e1 = torch.zeros(d)
    e1[0] = 1.0
    mp = -separation * e1 + 0.8 * torch.randn(2, d, generator=g)
    mq = separation * e1 + 0.8 * torch.randn(2, d, generator=g)
    p = GaussianMixture(mp, stds=0.5, name=f"P{d}")
    q = GaussianMixture(mq, stds=torch.tensor([0.4, 0.7]), name=f"Q{d}")
    return p, q


def gaussian_pair() -> tuple[GaussianMixture, GaussianMixture, float]:
    """Two correlated 2-D Gaussians and their closed-form W2^2."""
    m1, m2 = torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    s1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]])
    s2 = torch.tensor([[0.4, -0.1], [-0.1, 1.5]])
    return (
        GaussianMixture(m1[None], s1[None]),
        GaussianMixture(m2[None], s2[None]),
        gaussian_w2_sq(m1, s1, m2, s2),
    )


def unequal_spread_pair() -> tuple[GaussianMixture, GaussianMixture]:
    """A 2-D pair like the tutorial's Fig. 10: two separated mixtures whose components swap
    spreads (P: stds 0.3 and 0.6; Q: 0.8 and 0.25), so the flow narrows one and widens the other."""
    mp = torch.tensor([[-2.0, -1.0], [-2.0, 1.5]])
    mq = torch.tensor([[2.0, -1.5], [2.5, 1.0]])
    p = GaussianMixture(mp, stds=torch.tensor([0.3, 0.6]), name="P2u")
    q = GaussianMixture(mq, stds=torch.tensor([0.8, 0.25]), name="Q2u")
    return p, q


def random_gaussian_pair(d: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(m1, S1, m2, S2)`` in float64: means ``N(0, I)``, covariances ``R diag(e^u) R^T`` with
    ``R`` a random rotation and ``u ~ U(-1, 1)`` (eigenvalues in ``[e^-1, e]``)."""
    g = torch.Generator().manual_seed(1000 + 97 * seed + d)
    out = []
    for _ in range(2):
        m = torch.randn(d, generator=g, dtype=torch.float64)
        rot = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        ev = torch.exp(torch.empty(d, dtype=torch.float64).uniform_(-1.0, 1.0, generator=g))
        out += [m, (rot * ev) @ rot.T]
    return out[0], out[1], out[2], out[3]


def options(quick: bool) -> dict[str, Any]:
    scale = 0.1 if quick else 1.0

    def n(k: int) -> int:
        return max(10, int(k * scale))

    transport = TransportOptions(init_steps=n(2000))  # the defaults otherwise
    clf = ClassifierOptions(hidden=(64, 64), steps=n(2000), batch_size=256)
    default_tel = TelescopicOptions()  # the defaults (2 intervals), the steps scaled
    tel = dataclasses.replace(
        default_tel, classifier=dataclasses.replace(default_tel.classifier, steps=n(2000))
    )
    return {"transport": transport, "classifier": clf, "telescopic": tel, "kde": KDEOptions()}


def run_pair(
    p: GaussianMixture,
    q: GaussianMixture,
    opts: dict[str, Any],
    n_train: int,
    n_test: int,
    seed: int,
    linear_map: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Any]:
    """Transport and the three log-ratio estimators on one pair; with the closed-form OT map
    ``linear_map = (A, c)`` also the learned map's RMSE on the held-out source points."""
    g = torch.Generator().manual_seed(seed)
    xp, xq = p.sample(n_train, g), q.sample(n_train, g)
    tp, tq = p.sample(n_test, g), q.sample(n_test, g)
    truth_p = q.log_prob(tp.double()) - p.log_prob(tp.double())
    truth_q = q.log_prob(tq.double()) - p.log_prob(tq.double())
    row: dict[str, Any] = {
        "d": p.dim,
        "n_train": n_train,
        "n_test": n_test,
        "true_log_ratio_mean_on_P": float(truth_p.mean()),
        "true_log_ratio_mean_on_Q": float(truth_q.mean()),
    }
    t0 = time.perf_counter()
    res = fit_transport(xp, xq, opts["transport"], generator=g)
    row["seconds_transport"] = time.perf_counter() - t0
    row["w2_sq_flow"] = res.w2_sq
    row["kinetic_minus_displacement"] = res.w2_sq - 0.5 * (
        res.cost.displacement_forward + res.cost.displacement_backward
    )
    if linear_map is not None:
        a, c = linear_map
        err = res.forward(tp).double() - (tp.double() @ a.T + c)
        row["map_rmse"] = float(err.pow(2).sum(1).mean().sqrt())
        row["w2_sq_plug_in"] = gaussian_w2_sq(xp.double().mean(0), torch.cov(xp.double().T),
                                              xq.double().mean(0), torch.cov(xq.double().T))  # fmt: skip
    if p.dim == 2:
        row["w2_sq_pot_test"] = w2(tp, tq, max_n=n_test) ** 2
    fits = {
        "telescopic": lambda: fit_telescopic(res.flow, xp, xq, opts["telescopic"], generator=g),
        "classifier": lambda: fit_classifier(xp, xq, opts["classifier"], generator=g),
        "kde": lambda: fit_kde(xp, xq, opts["kde"]),
    }
    for name, fit in fits.items():
        t0 = time.perf_counter()
        est = fit()
        row[f"seconds_{name}"] = time.perf_counter() - t0
        row[f"mse_P_{name}"] = log_ratio_mse(est.log_ratio(tp), truth_p)
        row[f"mse_Q_{name}"] = log_ratio_mse(est.log_ratio(tq), truth_q)
    return row


def run_random_gaussian(
    d: int, opts: dict[str, Any], n_train: int, n_test: int, seed: int
) -> dict[str, Any]:
    """A random Gaussian pair (:func:`random_gaussian_pair`): :func:`run_pair` with the
    Bures-Wasserstein ``W2^2`` and the closed-form map."""
    m1, s1, m2, s2 = random_gaussian_pair(d, seed)
    p = GaussianMixture(m1[None].float(), s1[None].float())
    q = GaussianMixture(m2[None].float(), s2[None].float())
    row = run_pair(p, q, opts, n_train, n_test, seed, gaussian_ot_map(m1, s1, m2, s2))
    exact = gaussian_w2_sq(m1, s1, m2, s2)
    row.update(w2_sq_closed_form=exact, relative_error=row["w2_sq_flow"] / exact - 1.0,
               relative_error_plug_in=row["w2_sq_flow"] / row["w2_sq_plug_in"] - 1.0,
               map_rmse_relative=row["map_rmse"] / math.sqrt(exact))  # fmt: skip
    return row


def run_gaussian(opts: dict[str, Any], n_train: int, n_test: int, seed: int) -> dict[str, Any]:
    p, q, exact = gaussian_pair()
    g = torch.Generator().manual_seed(seed)
    xp, xq = p.sample(n_train, g), q.sample(n_train, g)
    t0 = time.perf_counter()
    res = fit_transport(xp, xq, opts["transport"], generator=g)
    seconds = time.perf_counter() - t0
    tp, tq = p.sample(n_test, g), q.sample(n_test, g)
    m1, s1 = p.means[0].double(), p.covs[0].double()
    a, c = gaussian_ot_map(m1, s1, q.means[0].double(), q.covs[0].double())
    err = res.forward(tp).double() - (tp.double() @ a.T + c)
    return {
        "w2_sq_closed_form": exact,
        "w2_sq_flow": res.w2_sq,
        "relative_error": res.w2_sq / exact - 1.0,
        "map_rmse": float(err.pow(2).sum(1).mean().sqrt()),
        "w2_sq_pot_test": w2(tp, tq, max_n=n_test) ** 2,
        "seconds": seconds,
    }


def ratio_cells(r: dict[str, Any]) -> str:
    """The six MSE cells of a row (the best per side in bold)."""
    methods = ("telescopic", "classifier", "kde")
    cells = []
    for side in ("P", "Q"):
        best = min(methods, key=lambda m: r[f"mse_{side}_{m}"])
        for m in methods:
            v = f"{r[f'mse_{side}_{m}']:.4g}"
            cells.append(f"**{v}**" if m == best else v)
    return " | ".join(cells)


def gauss_table(rows: list[dict[str, Any]]) -> str:
    """Random Gaussian pairs: W2^2 against the closed forms, the map's RMSE and the ratios."""
    methods = ("telescopic", "classifier", "kde")
    lines = [
        "| d | W2^2 Bures | W2^2 flow | error vs Bures | error vs plug-in Bures | kinetic - "
        "displacement | map RMSE (rel. to W2) | "
        + " | ".join(f"MSE on P: {m}" for m in methods)
        + " | "
        + " | ".join(f"MSE on Q: {m}" for m in methods)
        + " |",
        "|---" * 13 + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d']} | {r['w2_sq_closed_form']:.4g} | {r['w2_sq_flow']:.4g} | "
            f"{100 * r['relative_error']:+.2f}% | {100 * r['relative_error_plug_in']:+.2f}% | "
            f"{r['kinetic_minus_displacement']:.3g} | {r['map_rmse']:.3g} "
            f"({100 * r['map_rmse_relative']:.1f}%) | {ratio_cells(r)} |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], gauss: dict[str, Any]) -> str:
    methods = ("telescopic", "classifier", "kde")
    lines = [
        "| d | "
        + " | ".join(f"MSE on P: {m}" for m in methods)
        + " | "
        + " | ".join(f"MSE on Q: {m}" for m in methods)
        + " | W2^2 flow | W2^2 POT (test) |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        best_p = min(methods, key=lambda m: r[f"mse_P_{m}"])
        best_q = min(methods, key=lambda m: r[f"mse_Q_{m}"])

        def cell(m: str, side: str, best: str, r: dict[str, Any] = r) -> str:
            v = f"{r[f'mse_{side}_{m}']:.4g}"
            return f"**{v}**" if m == best else v

        pot = f"{r['w2_sq_pot_test']:.4g}" if "w2_sq_pot_test" in r else "-"
        lines.append(
            f"| {r.get('pair', r['d'])} | "
            + " | ".join(cell(m, "P", best_p) for m in methods)
            + " | "
            + " | ".join(cell(m, "Q", best_q) for m in methods)
            + f" | {r['w2_sq_flow']:.4g} | {pot} |"
        )
    lines += [
        "",
        "| Gaussian pair (2-D) | W2^2 closed form | W2^2 flow | relative error | map RMSE | "
        "W2^2 POT (test) |",
        "|---|---|---|---|---|---|",
        f"| N(m1,S1) -> N(m2,S2) | {gauss['w2_sq_closed_form']:.4g} | {gauss['w2_sq_flow']:.4g} | "
        f"{100 * gauss['relative_error']:+.2f}% | {gauss['map_rmse']:.3g} | "
        f"{gauss['w2_sq_pot_test']:.4g} |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="2,10,20", help="comma-separated dimensions")
    ap.add_argument(
        "--gauss-dims", default="5,10,20", help="dimensions of the random Gaussian pairs"
    )
    ap.add_argument("--n-train-gauss", type=int, default=20_000)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument(
        "--no-unequal", action="store_true", help="skip the 2-D pair of unequal spreads"
    )
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="short trainings (smoke test)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the results as JSON here (and the table as .md)",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    opts = options(args.quick)
    t_start = time.perf_counter()
    rows = []
    for d in (int(v) for v in args.dims.split(",") if v.strip()):
        p, q = mixture_pair(d, seed=d)
        rows.append(run_pair(p, q, opts, args.n_train, args.n_test, args.seed))
        print(f"d={d} done after {time.perf_counter() - t_start:.0f} s", flush=True)
    if not args.no_unequal:
        p, q = unequal_spread_pair()
        rows.append(
            {
                "pair": "2 (unequal spreads)",
                **run_pair(p, q, opts, args.n_train, args.n_test, args.seed),
            }
        )
        print(f"unequal spreads done after {time.perf_counter() - t_start:.0f} s", flush=True)
    gauss = run_gaussian(opts, 20_000, args.n_test, args.seed)
    grows = []
    for d in (int(v) for v in args.gauss_dims.split(",") if v.strip()):
        grows.append(run_random_gaussian(d, opts, args.n_train_gauss, args.n_test, args.seed))
        print(f"Gaussian d={d} done after {time.perf_counter() - t_start:.0f} s", flush=True)
    total = time.perf_counter() - t_start
    info = {**machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    md = table(rows, gauss) + ("\n\n" + gauss_table(grows) if grows else "")
    print(f"\nMachine: {info}; total {total:.0f} s\n")
    print(md)

    def wins(rs: list[dict[str, Any]]) -> list[Any]:
        return [
            r.get("pair", r["d"])
            for r in rs
            if all(
                r[f"mse_{s}_telescopic"] < min(r[f"mse_{s}_classifier"], r[f"mse_{s}_kde"])
                for s in ("P", "Q")
            )
        ]

    errors = ", ".join(f"{r['d']}-D {100 * r['relative_error']:+.2f}%" for r in grows)
    print(
        f"\ntelescopic below both baselines on P and on Q for the mixtures in d = {wins(rows)}, "
        f"for the Gaussian pairs in d = {wins(grows)}; Gaussian W2^2 relative error "
        f"{100 * gauss['relative_error']:+.2f}% (2-D pair), {errors}"
    )
    if args.out is not None:
        result = {
            "machine": info,
            "seconds": total,
            "quick": args.quick,
            "options": {k: dataclasses.asdict(v) for k, v in opts.items()},
            "mixtures": rows,
            "gaussian": gauss,
            "gaussian_pairs": grows,
            "telescopic_wins_dims": wins(rows),
            "telescopic_wins_gaussian_dims": wins(grows),
            "finite": all(
                math.isfinite(v) for r in rows + grows for v in r.values() if isinstance(v, float)
            ),
        }
        write_json(str(args.out), result)
        header = f"Machine: {info}; total {total:.0f} s; command: {' '.join(sys.argv)}\n\n"
        args.out.with_suffix(".md").write_text(header + md + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
