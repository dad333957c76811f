"""The compiled minibatch-OT pairing against the NumPy one: time and transport cost, five data sets.

``ot_solver="auto"`` pairs batches of one or two columns with the compiled pairing
(:mod:`iterflow.core.ot_compiled`, numba) and without numba with the NumPy one
(:func:`iterflow.core.couplings.auto_pairing_np`). This times both, and the compiled pairing's two
knobs (rows of the exact chunks, points a grid cell of the 2-opt stage) around its default, on data
sets of different shapes against Gaussian noise (standardised, as the trainer sees them):
checkerboard, two moons, eight Gaussians, rings, a uniform square; at several batch sizes. For each
setting: the median milliseconds of a pairing (interleaved rounds: every setting sees the machine's
good and bad minutes alike) and the mean and worst transport cost over the exact assignment (scipy's
``linear_sum_assignment`` on the whole batch), per data set.

Usage (the machine otherwise idle)::

    OMP_NUM_THREADS=2 python benchmarks/bench_ot_compiled.py \\
        --out benchmarks/results/ot_compiled_t2.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

from iterflow import flush_denormals  # noqa: E402
from iterflow.core import couplings as C  # noqa: E402
from iterflow.core import ot_compiled as O  # noqa: E402
from iterflow.data import get_dataset  # noqa: E402

DATASETS = ("checkerboard", "moons", "8gaussians", "rings", "uniform square")


def data_units(name: str, seed: int) -> np.ndarray:
    """20,000 rows of ``name`` standardised (the uniform square: ``U[-2, 2]^2``)."""
    if name == "uniform square":
        return np.random.default_rng(seed).random((20_000, 2)) * 4 - 2
    x = get_dataset(name).splits(20_000, 10, 10, seed).train.double()
    return ((x - x.mean(0)) / x.std(0)).numpy()


def exact_cost(a: np.ndarray, b: np.ndarray) -> float:
    c = ((a[:, None] - b[None]) ** 2).sum(-1)
    r, col = linear_sum_assignment(c)
    return float(c[r, col].mean())


def settings() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    frame = C._frames(2, 1)[0]

    def compiled(chunk: int, per: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda a, b: O.pair(a, b, frame, chunk, per)

    out = {"NumPy pairing (default without numba)": lambda a, b: C.auto_pairing_np(
        a, b, C.auto_chunk(len(a)))}  # fmt: skip
    for chunk in (24, 32, 48):
        for per in (1.0, 1.5, 2.0):
            tag = " (default)" if (chunk, per) == (O.CHUNK, O.PER_CELL) else ""
            out[f"compiled, chunks {chunk}, {per:g} a cell{tag}"] = compiled(chunk, per)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the pairing uses one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[300, 1024, 2048])
    ap.add_argument("--problems", type=int, default=3, help="batches per data set and size")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flush_denormals()
    torch.set_num_threads(args.threads)
    if not O.AVAILABLE:
        sys.exit("numba is not installed: pip install iterflow[fast]")
    rng = np.random.default_rng(args.seed)
    units = {name: data_units(name, args.seed) for name in DATASETS}
    pairings = settings()
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        problems = []
        for name, x in units.items():
            for _ in range(args.problems):
                a, b = x[rng.integers(0, len(x), n)], rng.normal(size=(n, 2))
                problems.append((name, a, b, exact_cost(a, b)))
        for pair in pairings.values():
            pair(*problems[0][1:3])  # warm-up (compilation or its cache)
        times: dict[str, list[float]] = {k: [] for k in pairings}
        ratios: dict[str, dict[str, list[float]]] = {k: {d: [] for d in DATASETS} for k in pairings}
        for rnd in range(args.rounds):
            for key, pair in pairings.items():
                for name, a, b, exact in problems:
                    t0 = time.perf_counter()
                    p = pair(a, b)
                    times[key].append(time.perf_counter() - t0)
                    if rnd == 0:
                        ratios[key][name].append(float(((a - b[p]) ** 2).sum(1).mean()) / exact)
        numpy_ms = 1e3 * statistics.median(times[next(iter(pairings))])
        for key in pairings:
            ms = 1e3 * statistics.median(times[key])
            row = {"batch": n, "pairing": key, "ms": ms, "numpy_over_this": numpy_ms / ms}
            for d in DATASETS:
                row[d] = float(np.mean(ratios[key][d]))
            row["worst"] = max(max(v) for v in ratios[key].values())
            rows.append(row)
        print(f"batch {n} done", file=sys.stderr)
    info = {**machine(), "threads": args.threads, "problems": args.problems,
            "rounds": args.rounds, "load_before": load_before,
            "load_after": os.getloadavg()}  # fmt: skip
    print(f"machine: {info}\n")
    print("transport cost over the exact assignment (mean per data set, worst of all):\n")
    print(table(rows, ["batch", "pairing", "ms", "numpy_over_this", *DATASETS, "worst"]))
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
