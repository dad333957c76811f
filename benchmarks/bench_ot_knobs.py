"""Minibatch-OT pairing: time against transport cost over the ``auto`` solver's knobs.

``ot_solver="auto"`` (:mod:`iterflow.core.couplings`) pairs a large batch in three stages: exact
assignment on spatially stratified chunks, parallel 2-opt passes, rounds of exact re-assignment in
windows of neighbouring pairs. This sweeps the stages' sizes (chunk rows, 2-opt passes, window
rounds and sizes) on the checkerboard against Gaussian noise (the training section's data, in the
trainer's standardised units) and prints, for each setting, the median milliseconds of a pairing
and the mean transport cost over the exact whole-batch assignment (POT ``emd``), with the settings
that no faster setting beats in cost (the frontier) marked, the default and the default before the
eighteenth session among them. The settings are timed in interleaved rounds (no setting gets the
machine's good minutes). Two last tables time the default with scipy's solver on column-reduced
costs (``couplings._reduced``) and on the squared distances themselves, interleaved, and the row
gathers of the stages by fancy indexing and by ``np.take`` (``couplings._rows``).

Issue 14 asks for training with OT at 0.8x of independent pairs at batch 1024 and two threads, at
a cost within 1.1x of the exact one. Flow matching pairs the next batch in a background thread
(:class:`iterflow.core.coupled_batches.CoupledBatches`) that takes one of the two cores, so the
pairing has to take no longer than a one-thread step (about 6 ms) and the one-thread step has to
run at 0.8x the two-thread one.

Usage (the machine otherwise idle)::

    OMP_NUM_THREADS=2 python benchmarks/bench_ot_knobs.py --threads 2 \\
        --out benchmarks/results/ot_knobs_t2.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkerboard_model_units, machine, ot_batches, table, write_json  # noqa: E402

from iterflow import flush_denormals  # noqa: E402
from iterflow.core import couplings as C  # noqa: E402

#: ``(chunk, passes, window rounds, window)`` of ``ot_solver="auto"`` before the eighteenth
#: session (always in the sweep, for comparison).
PREVIOUS_DEFAULT = (48, 4, 2, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--problems", type=int, default=6, help="batches timed per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep-rounds", type=int, default=3, help="interleaved rounds of the sweep")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the reduction A/B")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flush_denormals()
    torch.set_num_threads(args.threads)
    x = checkerboard_model_units(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    batches = ot_batches(x, args.problems, args.batch, g)
    problems = [(C._numpy(a), C._numpy(b)) for a, b in batches]

    def cost(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
        return C.transport_cost(torch.from_numpy(a), torch.from_numpy(b[p]))

    exact = [cost(a, b, C._solve(C._sq_dists(a[None], b[None])[0], "emd")) for a, b in problems]
    passes, rounds, window = C.auto_stages(2, args.batch)
    default = (C.AUTO_CHUNK, passes, rounds, window if rounds else 32)  # as the grid writes it
    grid = itertools.product((16, 24, 32, 48), (0, 2, 4, 8, 12, 16), ((0, 32), (1, 16), (2, 16), (1, 24),
                                                             (2, 24), (1, 32), (2, 32), (3, 24),
                                                             (4, 16)))  # fmt: skip
    settings = [default] + [(c, r, w, s) for c, r, (w, s) in grid if (c, r, w, s) != default]
    if PREVIOUS_DEFAULT not in settings:
        settings.append(PREVIOUS_DEFAULT)
    for setting in settings:
        C.auto_pairing_np(*problems[0], *setting)  # warm-up
    times: dict[tuple[int, ...], list[float]] = {s: [] for s in settings}
    ratios: dict[tuple[int, ...], list[float]] = {s: [] for s in settings}
    for rnd in range(args.sweep_rounds):  # interleaved: no setting gets the machine's good minutes
        for setting in settings:
            for (a, b), c in zip(problems, exact, strict=True):
                t0 = time.perf_counter()
                p = C.auto_pairing_np(a, b, *setting)
                times[setting].append(time.perf_counter() - t0)
                if rnd == 0:
                    ratios[setting].append(cost(a, b, p) / c)
    rows: list[dict[str, Any]] = []
    for setting in settings:
        chunk, passes, rounds, window = setting
        rows.append({"chunk": chunk, "passes": passes, "window_rounds": rounds,
                     "window": window if rounds else 0, "ms": 1e3 * statistics.median(times[setting]),
                     "cost_vs_exact": float(np.mean(ratios[setting])),
                     "worst_cost_vs_exact": float(np.max(ratios[setting])),
                     "default": setting == default,
                     "previous_default": setting == PREVIOUS_DEFAULT})  # fmt: skip
    best = float("inf")
    for r in sorted(rows, key=lambda r: r["ms"]):
        r["frontier"] = r["cost_vs_exact"] < best
        best = min(best, r["cost_vs_exact"])
    rows.sort(key=lambda r: r["ms"])
    info = {**machine(), "batch": args.batch, "problems": args.problems}
    print(f"machine: {info}\n")
    cols = ["chunk", "passes", "window_rounds", "window", "ms", "cost_vs_exact", "frontier"]
    print(table([r for r in rows if r["frontier"] or r["default"] or r["previous_default"]],
                cols + ["worst_cost_vs_exact", "default", "previous_default"]))  # fmt: skip
    fast = [r for r in rows if r["cost_vs_exact"] <= 1.1]
    if fast:
        r = fast[0]
        print(f"\nfastest within 1.1x of the exact cost: {r['ms']:.2f} ms ({r})")
    reduction = reduction_ab(problems, exact, cost, [default, PREVIOUS_DEFAULT], args.rounds)
    print("\nscipy's solver on column-reduced costs (couplings._reduced) or on the squared distances"
          f" themselves, interleaved, median of {args.rounds} rounds:\n")  # fmt: skip
    print(table(reduction, ["chunk", "passes", "window_rounds", "window", "ms_reduced", "ms_raw",
                            "raw_over_reduced", "cost_reduced", "cost_raw"]))  # fmt: skip
    gathers = gather_times(problems[0][0], args.rounds)
    print("\nrow gathers of the stages, µs per call, interleaved, median of"
          f" {args.rounds} rounds:\n")  # fmt: skip
    print(table(gathers, ["rows", "index_shape", "fancy_us", "np_take_us", "fancy_over_take"]))
    write_json(args.out, {"machine": info, "rows": rows, "reduction": reduction,
                          "gathers": gathers})  # fmt: skip


def gather_times(a: np.ndarray, rounds: int, calls: int = 2000) -> list[dict[str, Any]]:
    """``a[idx]`` against ``np.take(a, idx, axis=0)`` (``couplings._rows``) for the index shapes
    the stages use: a permutation, ``(chunks, 48)`` and ``(pairs, 2, 4)`` blocks."""
    n = a.shape[0]
    rng = np.random.default_rng(0)
    out = []
    for shape in [(n,), (n // 48, 48), (n // 8, 2, 4)]:
        idx = rng.permutation(n)[: int(np.prod(shape))].reshape(shape)
        times: dict[str, list[float]] = {"fancy": [], "take": []}
        for _ in range(rounds):
            for name in times:
                t0 = time.perf_counter()
                for _ in range(calls):
                    _ = a[idx] if name == "fancy" else C._rows(a, idx)
                times[name].append(1e6 * (time.perf_counter() - t0) / calls)
        fancy, take = (statistics.median(times[k]) for k in ("fancy", "take"))
        out.append({"rows": n, "index_shape": str(shape), "fancy_us": fancy, "np_take_us": take,
                    "fancy_over_take": fancy / take})  # fmt: skip
    return out


def reduction_ab(
    problems: list[tuple[np.ndarray, np.ndarray]],
    exact: list[float],
    cost: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    settings: list[tuple[int, int, int, int]],
    rounds: int,
) -> list[dict[str, Any]]:
    """The pairing's time with and without the column reduction (``C._reduced`` replaced by a
    copy: the solver then sees the squared distances, as before the eighteenth session)."""
    reduced = C._reduced
    rows = []
    for chunk, passes, wrounds, window in settings:
        times: dict[bool, list[float]] = {True: [], False: []}
        ratios: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for on in (True, False):
                C._reduced = reduced if on else np.array  # type: ignore[assignment]
                try:
                    for (a, b), c in zip(problems, exact, strict=True):
                        t0 = time.perf_counter()
                        p = C.auto_pairing_np(a, b, chunk, passes, wrounds, window)
                        times[on].append(time.perf_counter() - t0)
                        ratios[on].append(cost(a, b, p) / c)
                finally:
                    C._reduced = reduced  # type: ignore[assignment]
        on_ms, off_ms = (1e3 * statistics.median(times[k]) for k in (True, False))
        rows.append({"chunk": chunk, "passes": passes, "window_rounds": wrounds, "window": window,
                     "ms_reduced": on_ms, "ms_raw": off_ms, "raw_over_reduced": off_ms / on_ms,
                     "cost_reduced": float(np.mean(ratios[True])),
                     "cost_raw": float(np.mean(ratios[False]))})  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
