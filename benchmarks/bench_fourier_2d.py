"""Random Fourier features of x on every built-in 2-D data set: flow matching's recommended
settings against the same with ``x_freqs`` features of x (``--x-freqs/--x-scale``), each at its
own number of steps, one seed, the same test points.

For each data set and each variant the script trains ``iterflow train --method fm --data NAME``
(``TrainConfig.for_method("fm", ...)`` with the variant's settings), times the optimisation (the
trainer's own clock), and evaluates the test NLL (exact trace, dopri5 at 1e-5, float64) on the
same ``--n-test`` test rows of the first variant's run; every variant after the first is compared
with the first by the mean per-row NLL difference and its paired standard error.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/bench_fourier_2d.py --threads 2 --img2d-dir ../shared/data/img2d
    python benchmarks/bench_fourier_2d.py --data moons --variant '{"steps": 200}' --n-test 500  # quick

Writes ``benchmarks/results/fourier_2d.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_anytime import mean_se, nll_rows, paired_difference  # noqa: E402
from common import machine, table, write_json  # noqa: E402

from iterflow.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Every built-in 2-D set; rose and tree need ``--img2d-dir`` (skipped without it).
DATA = ("checkerboard", "8gaussians", "moons", "circles", "2spirals", "pinwheel", "rings",
        "swissroll", "gmm-2d", "rose", "tree")  # fmt: skip
#: Flow matching's recommended settings, then 64 features of x at 1 cycle per standardised unit
#: with 3,500 steps (the preset ``checkerboard-fourier``).
VARIANTS = ("{}", '{"x_freqs": 64, "x_scale": 1.0, "steps": 3500}')


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = [json.loads(v) for v in args.variant]
    results: list[dict[str, Any]] = []
    for name in args.data.split(","):
        if name in ("rose", "tree") and not os.environ.get("ITERFLOW_IMG2D_DIR"):
            print(f"[{name}] skipped: no --img2d-dir", flush=True)
            continue
        test = None
        rows0 = None
        for i, v in enumerate(variants):
            cfg = TrainConfig.for_method("fm", **{"data": name, "seed": args.seed, **v})
            with tempfile.TemporaryDirectory() as tmp:
                res = train(cfg, Path(tmp) / "run")
            if test is None:
                test = res.splits.test[: args.n_test]
            secs = sum(float(h["seconds_optimize"]) for h in res.history)
            rows, _ = nll_rows(res.flow, test, tol=1e-5, seed=args.seed)
            nll, se = mean_se(rows)
            row = {"data": name, "variant": json.dumps(v), "steps": cfg.steps,
                   "seconds_train": secs, "nll": nll, "nll_se": se}  # fmt: skip
            if i == 0:
                rows0 = rows
            else:
                d, dse = paired_difference(rows, rows0)
                row.update(minus_first=d, minus_first_se=dse)
            print(f"[{name}] {row}", flush=True)
            results.append(row)
    return {"machine": machine(), "threads": args.threads, "n_test": args.n_test,
            "seed": args.seed, "variants": variants, "rows": results,
            "load": os.getloadavg()}  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    head = (f"# Flow matching with and without random Fourier features of x, built-in 2-D sets\n\n"
            f"{result['threads']} thread(s), {result['machine']['cpu']}; seed {result['seed']}; "
            f"test NLL in nats on {result['n_test']} test rows (exact trace, dopri5 1e-5, float64); "
            f"'vs first' = mean per-row NLL difference to the first variant ± paired standard "
            f"error (negative: better). Load at the end: {result['load']}.\n\n")  # fmt: skip
    rows = [{"data": r["data"], "variant": r["variant"], "steps": r["steps"],
             "train s": round(r["seconds_train"], 1),
             "NLL": f"{r['nll']:.3f} ± {r['nll_se']:.3f}",
             "vs first": (f"{r['minus_first']:+.3f} ± {r['minus_first_se']:.3f}"
                          if "minus_first" in r else "")} for r in result["rows"]]  # fmt: skip
    return head + table(rows, list(rows[0])) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data", default=",".join(DATA))
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="TrainConfig settings as JSON (repeatable; the first is the reference)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img2d-dir", default=None, help="folder of the rose / tree densities")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fourier_2d"))
    args = ap.parse_args(argv)
    args.variant = args.variant or list(VARIANTS)
    if args.img2d_dir:
        os.environ["ITERFLOW_IMG2D_DIR"] = str(Path(args.img2d_dir).resolve())
    torch.set_num_threads(args.threads)
    result = run(args)
    md = markdown(result)
    print(md)
    write_json(args.out + ".json", result)
    Path(args.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
