"""Rectified flow end to end from the CLI: 1-, 2- and 3-rectified flow, a distilled one-step sampler
and flow matching with the minibatch-OT coupling, compared by W2 at NFE 1, 2, 4, 8, 32 (Euler),
straightness, transport cost and training cost; plus memorisation of the closed-form velocity.

    OMP_NUM_THREADS=1 python benchmarks/bench_reflow.py [--data checkerboard,8gaussians]
        [--out bench_out/reflow.json] [--workdir DIR]

For each data set the script runs these commands (in process, via ``iterflow.cli.main``):

    iterflow train --method fm --data D --out W/fm --steps 3000 --hidden 256,256,256 \\
        --batch-size 512 --lr 2e-3 --time-freqs 0 --n-train 50000 --no-report -q    # 1-RF
    iterflow reflow W/fm --out W/rf --rounds 2 --steps 1500 --n-pairs 20000 \\
        --pair-solver rk4 --pair-steps 16 --no-report -q   # W/rf/rounds/round_1: 2-RF; W/rf: 3-RF
    iterflow distill W/rf --out W/distill --k-steps 1 --steps 1500 --n-pairs 20000 \\
        --pair-steps 16 --no-report -q                      # one-step sampler from the 3-RF
    iterflow train --method fm -o coupling=ot -o ot_solver=lsa ...  (as the first)  # FM, OT pairs

Every run is scored on its held-out split: W2 (exact, POT) between ``--n-eval`` Euler samples at
each NFE and ``--n-eval`` test points, averaged over ``--eval-seeds`` seeds (W2 of two finite
samples has a positive bias; the "data" row, fresh data against the test points, is that floor); the
straightness ``int_0^1 E|(X_1 - X_0) - v(X_s, s)|^2 ds`` and transport cost ``E|X_1 - X_0|^2`` in
model units on 1,000 noise draws (RK4, 32 steps); the training cost is the trainer's wall time of
each round (pair simulation included). The closed-form velocity of the first ``--memo-n`` training
points (:func:`iterflow.rectified.closed_form_flow`) is compared with the 1-rectified network by the
median distance of samples to their nearest training point, next to that of held-out points.

The issue's acceptance: 2-RF straighter than 1-RF, and the distilled one-step W2 within 25% of the
1-RF's 32-step W2 on checkerboard (the script prints both checks). All options: ``--help``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

from iterflow import cli  # noqa: E402
from iterflow.apps.report import test_split  # noqa: E402
from iterflow.cli import reflow as rectified_commands  # noqa: E402
from iterflow.core.rectified import closed_form_flow, straightness  # noqa: E402
from iterflow.evaluation.quality import memorization, w2_by_nfe  # noqa: E402
from iterflow.metrics import w2  # noqa: E402
from iterflow.train import load_run  # noqa: E402

NFES = (1, 2, 4, 8, 32)

if "reflow" not in [
    c.name for c in cli.app.registered_commands
]:  # until cli.py registers commands/
    rectified_commands.register(cli.app)


def iterflow(*args: str) -> float:
    """Run one CLI command in process; return its wall time (fails loudly on a non-zero status)."""
    t0 = time.perf_counter()
    code = cli.main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"iterflow {' '.join(map(str, args))} exited with {code}")
    return time.perf_counter() - t0


def train_all(data: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Train the five models of one data set; return run folders and wall times."""
    fm = (
        f"--data {data} --steps {a.fm_steps} --hidden {a.hidden} --batch-size {a.batch_size} "
        f"--lr {a.lr} --time-freqs {a.time_freqs} --n-train {a.n_train} --seed {a.seed} "
        "--no-report -q"
    ).split()
    pairs = f"--n-pairs {a.n_pairs} --pair-solver rk4 --pair-steps {a.pair_steps} --no-report -q"
    rf, dist, fm_ot = work / "rf", work / "distill", work / "fm_ot"
    wall = {"1-RF": iterflow("train", "--method", "fm", "--out", work / "fm", *fm)}
    wall["reflow"] = iterflow(
        "reflow", work / "fm", "--out", rf, *f"--rounds {a.rounds} --steps {a.reflow_steps}".split(),
        *pairs.split(),
    )  # fmt: skip
    wall["distilled"] = iterflow(
        "distill", rf, "--out", dist, *f"--k-steps 1 --steps {a.distill_steps}".split(),
        *pairs.split(),
    )  # fmt: skip
    wall["FM-OT"] = iterflow(
        "train", "--method", "fm", "-o", "coupling=ot", "-o", "ot_solver=lsa", "--out", fm_ot, *fm
    )
    runs = {"1-RF": work / "fm"}
    for j in range(1, a.rounds):
        runs[f"{j + 1}-RF"] = rf / "rounds" / f"round_{j}"
    runs[f"{a.rounds + 1}-RF"] = rf
    runs[f"distilled ({a.rounds + 1}-RF, 1 step)"] = dist
    runs["FM-OT"] = fm_ot
    return {"runs": runs, "wall": wall}


def score(run: Path, a: argparse.Namespace) -> dict[str, Any]:
    """W2 by NFE (seed-averaged), straightness, transport cost and training cost of one run."""
    flow, cfg, meta = load_run(run)
    test, _, _ = test_split(cfg)
    per_seed = []
    for s in range(a.eval_seeds):
        ref = torch.roll(test, -s * a.n_eval // 2, 0)[: a.n_eval]
        per_seed.append(w2_by_nfe(flow, ref, NFES, seed=s))
    row: dict[str, Any] = {
        f"W2@{k}": sum(r[k] for r in per_seed) / len(per_seed) for k in per_seed[0]
    }
    st = straightness(flow, 1000, generator=torch.Generator().manual_seed(a.seed))
    row.update(
        {
            "straightness": st.straightness,
            "transport_cost": st.transport_cost,
            "train_s": float(meta["train_seconds"]),
            "steps": cfg.steps,
            "method": cfg.method,
        }
    )
    return row


def floor(run: Path, a: argparse.Namespace) -> float:
    """Seed-averaged W2 of fresh data against the run's test points (a perfect sampler's score)."""
    _, cfg, _ = load_run(run)
    test, _, ds = test_split(cfg)
    vals = []
    for s in range(a.eval_seeds):
        fresh = ds.sample(a.n_eval, torch.Generator().manual_seed(10_000 + s))
        vals.append(w2(fresh, torch.roll(test, -s * a.n_eval // 2, 0)[: a.n_eval], seed=s))
    return sum(vals) / len(vals)


def memorisation(run: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    """Closed-form velocity of the first ``memo_n`` training points against the trained network."""
    flow, cfg, _ = load_run(run)
    from iterflow.data import get_dataset

    splits = get_dataset(cfg.data).splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    small = splits.train[: a.memo_n]
    exact = closed_form_flow(small, shift=flow.shift, scale=flow.scale)
    rows = []
    for name, model, ref in (
        ("closed-form v*", exact, small),
        ("1-RF network", flow, splits.train),
    ):
        g = torch.Generator().manual_seed(a.seed)
        m = memorization(model, ref, splits.test, n=1000, generator=g, solver="euler", steps=128)
        rows.append(
            {
                "model": name,
                "train_points": len(ref),
                "samples_nn_median": m.samples_median,
                "heldout_nn_median": m.heldout_median,
                "ratio": m.samples_median / m.heldout_median,
            }
        )
    return rows


def bench(data: str, work: Path, a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    trained = train_all(data, work, a)
    rows = []
    for name, run in trained["runs"].items():
        rows.append({"model": name, **score(run, a)})
    rows.append({"model": "data (W2 floor)", "W2@32": floor(trained["runs"]["1-RF"], a)})
    memo = memorisation(trained["runs"]["1-RF"], a)
    return {
        "data": data,
        "rows": rows,
        "memorisation": memo,
        "command_wall_s": trained["wall"],
        "total_wall_s": time.perf_counter() - t0,
    }


def checks(result: dict[str, Any]) -> list[str]:
    rows = {r["model"]: r for r in result["rows"]}
    one, two = rows["1-RF"], rows["2-RF"]
    dist = next(r for k, r in rows.items() if k.startswith("distilled"))
    ratio = dist["W2@1"] / one["W2@32"]
    return [
        f"2-RF straightness {two['straightness']:.4g} vs 1-RF {one['straightness']:.4g}: "
        f"{'straighter' if two['straightness'] < one['straightness'] else 'NOT straighter'}",
        f"distilled one-step W2 {dist['W2@1']:.4g} vs 1-RF 32-step W2 {one['W2@32']:.4g}: "
        f"ratio {ratio:.3f} "
        f"({'within' if ratio <= 1.25 else 'NOT within'} 25%)",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default="checkerboard,8gaussians", help="comma-separated data sets")
    ap.add_argument("--fm-steps", type=int, default=3000, help="steps of the FM and FM-OT runs")
    ap.add_argument("--reflow-steps", type=int, default=1500, help="steps per reflow round")
    ap.add_argument("--distill-steps", type=int, default=1500)
    ap.add_argument(
        "--rounds", type=int, default=2, help="reflow rounds (2: up to the 3-rectified flow)"
    )
    ap.add_argument("--n-pairs", type=int, default=20_000)
    ap.add_argument("--pair-steps", type=int, default=16, help="RK4 steps that simulate the pairs")
    ap.add_argument("--hidden", default="256,256,256")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every run")
    ap.add_argument("--time-freqs", type=int, default=0, help="Fourier time features of the MLP")
    ap.add_argument("--n-train", type=int, default=50_000)
    ap.add_argument("--n-eval", type=int, default=2000, help="samples and test points per W2")
    ap.add_argument(
        "--eval-seeds", type=int, default=3, help="W2 figures are averaged over this many"
    )
    ap.add_argument(
        "--memo-n", type=int, default=1000, help="training points of the closed-form flow"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--workdir", default=None, help="keep the run folders here (default: a temp dir)"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be >= 1")
    info = machine()
    print(f"machine: {info}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir) if a.workdir else Path(tmp)
        for data in a.data.split(","):
            res = bench(data, root / data, a)
            results.append(res)
            print(f"\n## {data}  (wall {res['total_wall_s']:.0f} s)\n")
            cols = [
                "model",
                *[f"W2@{k}" for k in NFES],
                "straightness",
                "transport_cost",
                "train_s",
                "steps",
            ]
            print(table(res["rows"], cols))
            print()
            print(
                table(
                    res["memorisation"],
                    ["model", "train_points", "samples_nn_median", "heldout_nn_median", "ratio"],
                )
            )
            for line in checks(res):
                print(f"- {line}")
    write_json(a.out, {"machine": info, "settings": vars(a), "results": results})


if __name__ == "__main__":
    main()
