"""Flow matching on checkerboard with a fixed MLP: training speed, NLL next to the entropy floor,
W2 at each NFE, and the time to evaluate the NLL.

    python benchmarks/bench_fm.py [--steps 3000] [--out bench_out/fm.json]

The network is the library default (3 hidden layers of 256, SiLU), batch 1024, straight interpolant,
independent coupling (and, with ``--ot``, the exact minibatch-OT coupling as well). The NLL is exact
(trace by autograd, dopri5 at atol = rtol = 1e-5) on 2,000 held-out points; the entropy of the
checkerboard, log 32 = 3.4657 nats, is the floor of any model's expected NLL.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

from iterflow.evaluation.evaluate import evaluate  # noqa: E402
from iterflow.train import TrainConfig, train  # noqa: E402


def run(steps: int, coupling: str, seed: int, n_eval: int) -> dict:
    cfg = TrainConfig(data="checkerboard", steps=steps, seed=seed, options={"coupling": coupling})
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(cfg, Path(tmp) / "run")
        wall = time.perf_counter() - t0
    opt_s = res.history[0]["seconds_optimize"]
    from iterflow.data import get_dataset

    ds = get_dataset("checkerboard")
    m = evaluate(res.flow, res.splits.test, entropy=ds.entropy(), n=n_eval, seed=seed)
    return {
        "coupling": coupling,
        "steps": steps,
        "steps_per_s": steps / opt_s,
        "train_s": wall,
        "nll": m["nll"],
        "nll_stderr": m["nll_stderr"],
        "entropy": m["entropy"],
        "gap": m["nll_gap"],
        "nll_eval_s": m["seconds_nll"],
        "nfe_nll": m["nfe_nll"],
        "w2": m["w2"],
        **{f"w2@{k}": v for k, v in m["w2_by_nfe"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--ot", action="store_true", help="also train with the minibatch-OT coupling")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    rows = [run(args.steps, "independent", args.seed, args.n_eval)]
    if args.ot:
        rows.append(run(args.steps, "ot", args.seed, args.n_eval))
    info = machine()
    print(f"machine: {info}")
    cols = [
        "coupling",
        "steps",
        "steps_per_s",
        "train_s",
        "nll",
        "nll_stderr",
        "entropy",
        "gap",
        "nll_eval_s",
        "nfe_nll",
        "w2",
        "w2@1",
        "w2@2",
        "w2@4",
        "w2@8",
        "w2@32",
    ]
    print(table(rows, cols))
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
