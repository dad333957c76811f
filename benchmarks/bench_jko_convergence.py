"""JKO-flow's convergence block after block on the rose: per-block KL to N(0, I) (with its error),
W2 movement, the fitted geometric rate, and the effect of the adaptive step-size schedule and of
the movement-based stopping rule on test NLL and training time.

Runs (the rose of the JKO-flow paper; network and optimiser of the ``rose-jko`` preset):

* ``fixed``: ``gamma_n = gamma`` (constant).
* ``adaptive``: ``gamma_schedule = "adaptive"`` (:mod:`iterflow.methods.jko_schedule`: every block
  asked for the first block's W2 movement, the factor between blocks at most ``--growth``).
* ``fixed + stop`` and ``adaptive + stop``: the same runs with ``stop_tol`` (the chain stops once a
  block's ``E|x_n - x_{n-1}|^2`` falls below it). They are read off the runs above: the stopped
  chain is exactly the first ``k`` blocks of the full one (blocks are seeded per index and trained
  on the particles of the blocks before them; the rule is checked before a block is trained), so
  its NLL is the prefix's and its time the sum of those blocks' times.

Per block ``n`` and run: ``KL(p_n || N(0, I)) = E_p[log p(x) - log q_n(x)]`` on the held-out test
points (the rose's log density is exact, ``q_n`` the density of the first ``n`` blocks,
:func:`iterflow.methods.jko_schedule.prefix_kl`; unbiased, standard error of the per-point mean),
the k-NN estimate from the pushed validation particles alone (``kl_to_normal`` of the run's
history, with its batch-means error), and the W2 movement ``sqrt(E|x_n - x_{n-1}|^2)`` of the
validation particles. The rate is the least-squares slope of ``log KL_n`` against ``n`` (blocks
1..N): KL falls by ``exp(slope)`` per block. Test NLL ``= E[-log q_N(x)]``; the log densities use
dopri5 at tolerance ``--tol`` with the exact trace, and the script reports the change of the final
NLL at a 100 times tighter tolerance on 1,000 points (the solver's error).

Usage (writes benchmarks/results/jko_convergence.{json,md} and docs/images/jko_convergence.png)::

    ITERFLOW_IMG2D_DIR=/work/shared/data/img2d OMP_NUM_THREADS=1 \\
        python benchmarks/bench_jko_convergence.py --threads 1
    python benchmarks/bench_jko_convergence.py --quick   # smoke run, tiny budgets, no files
    python benchmarks/bench_jko_convergence.py --replot benchmarks/results/jko_convergence.json \\
        --stop-tol 0.01 0.005   # stopped variants of an earlier run's JSON, no training
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, table, write_json  # noqa: E402

from iterflow.core.ode import SolverSpec  # noqa: E402
from iterflow.data import get_dataset  # noqa: E402
from iterflow.methods.jko_schedule import mean_and_se, prefix_log_prob_rows  # noqa: E402
from iterflow.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def geometric_rate(kl: list[float]) -> dict[str, float]:
    """Least-squares fit ``log KL_n = a + b n`` over blocks ``n = 1..N`` with ``KL_n > 0``: the
    slope ``b``, its standard error, and the per-block factor ``exp(b)``."""
    n = np.array([i for i, v in enumerate(kl) if i >= 1 and v > 0], dtype=float)
    y = np.log(np.array([kl[int(i)] for i in n]))
    if n.size < 3:
        return {"slope": math.nan, "slope_se": math.nan, "factor": math.nan}
    coef, cov = np.polyfit(n, y, 1, cov=True)
    return {
        "slope": float(coef[0]),
        "slope_se": float(math.sqrt(cov[0, 0])),
        "factor": float(math.exp(coef[0])),
    }


def run(name: str, options: dict[str, Any], args: argparse.Namespace, work: Path) -> dict:
    cfg = TrainConfig(
        method="jko",
        data="rose",
        blocks=args.blocks,
        steps=args.steps,
        batch_size=512,
        lr=5e-3,
        hidden=(128, 128, 128),
        activation="gelu",
        time_freqs=0,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        img2d_dir=args.img2d_dir,
        options={"gamma": args.gamma, "substeps": 3, "jacobian": 0.02, **options},
    )
    t0 = time.perf_counter()
    res = train(cfg, work / name)
    wall = time.perf_counter() - t0
    test = res.splits.test.double()
    data = get_dataset("rose", img2d_dir=args.img2d_dir)
    log_p = data.log_prob(test)
    assert log_p is not None
    log_p = log_p.double()
    flow = res.flow.double()
    t_eval = time.perf_counter()
    rows = prefix_log_prob_rows(flow, test, solver=SolverSpec("dopri5", 16, args.tol, args.tol))
    t_eval = time.perf_counter() - t_eval
    fine = prefix_log_prob_rows(
        flow, test[:1000], solver=SolverSpec("dopri5", 16, args.tol / 100, args.tol / 100)
    )[-1]
    solver_err = abs(float(fine.mean()) - float(rows[-1][:1000].mean()))
    blocks = []
    elapsed = 0.0
    for n, lq in enumerate(rows):
        kl, kl_se = mean_and_se(log_p - lq)
        nll, nll_se = mean_and_se(-lq)
        rec: dict[str, Any] = {"block": n, "kl": kl, "kl_se": kl_se, "nll": nll, "nll_se": nll_se}
        if n >= 1:
            h = res.history[n - 1]
            elapsed += float(h["seconds"])
            rec.update(
                gamma=h["gamma"],
                movement=h["movement"],
                w2_movement=h["w2_movement"],
                w2_movement_se=h["w2_movement_se"],
                kl_knn=h.get("kl_to_normal"),
                kl_knn_se=h.get("kl_to_normal_se"),
                seconds=elapsed,
            )
        blocks.append(rec)
    print(f"{name}: {len(res.history)} blocks in {wall:.0f} s, NLL {blocks[-1]['nll']:.3f}")
    return {
        "name": name,
        "options": cfg.options,
        "train_seconds": sum(float(h["seconds"]) for h in res.history),
        "wall_seconds": wall,
        "eval_seconds": t_eval,
        "solver_error_nats": solver_err,
        "blocks": blocks,
        "rate": geometric_rate([b["kl"] for b in blocks]),
        "rate_w2": geometric_rate([b.get("w2_movement", -1.0) for b in blocks]),
    }


def stopped(r: dict, tol: float) -> dict:
    """The run ``r`` under the movement rule ``stop_tol = tol``: its first ``k`` blocks, ``k`` the
    first block whose movement fell below ``tol`` (all blocks when none did)."""
    blocks = r["blocks"]
    k = next((b["block"] for b in blocks[1:] if b["movement"] < tol), len(blocks) - 1)
    last = blocks[k]
    return {"name": f"{r['name']} + stop {tol:g}", "blocks_used": k, "nll": last["nll"],
            "nll_se": last["nll_se"], "train_seconds": last["seconds"]}  # fmt: skip


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for r, color in zip(runs, ("C0", "C1", "C2")):
        bl = r["blocks"]
        n = [x["block"] for x in bl]
        a.errorbar(n, [x["kl"] for x in bl], yerr=[2 * x["kl_se"] for x in bl], marker="o",
                   color=color, capsize=3,
                   label=f"{r['name']}: KL x{r['rate']['factor']:.2f} per block")  # fmt: skip
        knn = [(x["block"], x["kl_knn"]) for x in bl[1:] if x.get("kl_knn") is not None]
        if knn:
            a.plot(*zip(*knn), ls=":", marker="x", color=color, label=f"{r['name']}: k-NN")
        b.errorbar(n[1:], [x["w2_movement"] for x in bl[1:]],
                   yerr=[2 * x["w2_movement_se"] for x in bl[1:]], marker="o", color=color,
                   capsize=3, label=r["name"])  # fmt: skip
    a.set(yscale="log", xlabel="block n", ylabel="KL(p_n || N(0, I)) [nats]",
          title="KL to N(0, I) on test points (+-2 s.e.)")  # fmt: skip
    b.set(yscale="log", xlabel="block n", ylabel="sqrt(E|x_n - x_{n-1}|^2)",
          title="W2 movement of block n (+-2 s.e.)")  # fmt: skip
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(out: dict) -> str:
    lines = [
        "# JKO-flow convergence on the rose (benchmarks/bench_jko_convergence.py)",
        "",
        f"Command: `{out['command']}`. Machine: {out['machine']['cpu']}, "
        f"{out['machine']['threads']} thread(s); the machine was shared with other jobs, so the "
        "times are indicative. Entropy floor of the rose 2.487 nats.",
        "",
        f"Settings: {out['settings']}. Test NLL and KL on {out['settings']['n_test']} test points "
        f"(dopri5, tolerance {out['settings']['tol']}, exact trace; the final NLL moved by at most "
        f"{max(r['solver_error_nats'] for r in out['runs']):.1e} nats at a 100 times tighter "
        "tolerance). Stopped variants are prefixes of the full runs (see the script).",
        "",
        "## NLL and training time",
        "",
        table(
            out["summary"],
            [
                "name",
                "blocks_used",
                "nll",
                "nll_se",
                "train_seconds",
                "rate_factor",
                "rate_slope",
                "rate_slope_se",
            ],
        ),  # fmt: skip
    ]
    for r in out["runs"]:
        lines += ["", f"## Per block: {r['name']}", ""]
        lines.append(table(r["blocks"], ["block", "gamma", "kl", "kl_se", "kl_knn", "kl_knn_se",
                                         "w2_movement", "w2_movement_se", "nll", "seconds"]))  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=250, help="steps per block")
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--growth", type=float, default=2.0, help="adaptive: largest factor")
    ap.add_argument("--gamma-max", type=float, default=8.0)
    ap.add_argument("--stop-tol", type=float, nargs="+", default=[0.01, 0.005, 0.0025],
                    help="movement rule E|dx|^2 < tol (one stopped variant per value)")  # fmt: skip
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--tol", type=float, default=1e-5, help="dopri5 tolerance of the NLL")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--img2d-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, writes nothing")
    ap.add_argument("--replot", default=None, help="re-render md/png (and stopped variants for "
                    "--stop-tol) from this JSON of an earlier run, without training")  # fmt: skip
    args = ap.parse_args()
    if args.replot:
        out = json.loads(Path(args.replot).read_text())
        out["settings"]["stop_tol"] = args.stop_tol
        out["summary"] = summarize(out["runs"], args.stop_tol)
        write_outputs(out)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.blocks, args.steps, args.n_train, args.n_test = 4, 10, 2000, 500
    settings = {k: getattr(args, k) for k in ("blocks", "steps", "gamma", "growth", "gamma_max",
                                              "stop_tol", "n_train", "n_test", "tol", "seed")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = [
            run("fixed", {}, args, work),
            run(
                "adaptive",
                {
                    "gamma_schedule": "adaptive",
                    "gamma_growth": args.growth,
                    "gamma_max": args.gamma_max,
                },
                args,
                work,
            ),  # fmt: skip
        ]
    out = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "settings": settings,
        "summary": summarize(runs, args.stop_tol),
        "runs": runs,
    }
    if not args.quick:
        write_outputs(out)


def summarize(runs: list[dict], tols: list[float]) -> list[dict]:
    """One row per run (all blocks) and per run and stopping tolerance (its stopped prefix)."""
    summary = []
    for r in runs:
        last = r["blocks"][-1]
        summary.append({"name": r["name"], "blocks_used": len(r["blocks"]) - 1, "nll": last["nll"],
                        "nll_se": last["nll_se"], "train_seconds": r["train_seconds"],
                        "rate_factor": r["rate"]["factor"], "rate_slope": r["rate"]["slope"],
                        "rate_slope_se": r["rate"]["slope_se"]})  # fmt: skip
    summary += [stopped(r, tol) for tol in tols for r in runs]
    print(table(summary, ["name", "blocks_used", "nll", "nll_se", "train_seconds", "rate_factor"]))
    return summary


def write_outputs(out: dict) -> None:
    write_json(str(ROOT / "benchmarks/results/jko_convergence.json"), out)
    (ROOT / "benchmarks/results/jko_convergence.md").write_text(markdown(out))
    plot(out["runs"], ROOT / "docs/images/jko_convergence.png")


if __name__ == "__main__":
    main()
