"""How much of two cores is left for the minibatch-OT pairing while flow matching trains.

Flow matching with the OT coupling pairs the next minibatch in a background thread
(:class:`iterflow.core.coupled_batches.CoupledBatches`) and gives PyTorch one thread fewer while it
does. Issue 14 asks for training with OT at 0.8x the steps/s of independent pairs at two threads.
This measures, side by side in one process (interleaved rounds, medians), the demo recipe's
training steps/s (flow matching, checkerboard, 3 x 256 MLP, batch 1,024, defaults) with

* PyTorch at two threads and at one, alone;
* PyTorch at one thread and at two while a background thread pairs batches without pause
  (``couplings.auto_pairing_np`` on checkerboard batches against Gaussian noise, as the trainer's
  coupling does), with the pairings per second it manages meanwhile; and at one thread while a
  separate process does the same (no shared interpreter lock), and at two threads beside a pairing
  thread at Linux's idle priority (``SCHED_IDLE``: it may use only what the step leaves idle);
* the pairing alone (pairings per second).

With a pairing that keeps up (more pairings than steps per second), training with OT runs at the
steps/s of the "one thread + pairing" row; its ratio to "two threads alone" is the most the
background design can give, however fast the pairing. Sharing both cores between the step and
the pairing is the other design ("two threads + pairing").

Usage (the machine otherwise idle)::

    OMP_NUM_THREADS=2 python benchmarks/bench_ot_overlap.py --out benchmarks/results/ot_overlap_t2_b.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import checkerboard_model_units, machine, ot_batches, table, write_json  # noqa: E402

from iterflow.core import couplings as C  # noqa: E402
from iterflow.train import TrainConfig, train  # noqa: E402


def problems(count: int, batch: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Checkerboard batches (standardised, as the trainer's) and Gaussian noise, as NumPy rows."""
    g = torch.Generator().manual_seed(seed)
    pairs = ot_batches(checkerboard_model_units(seed), count, batch, g)
    return [(C._numpy(a), C._numpy(b)) for a, b in pairs]


def pair_until(batches: list[tuple[np.ndarray, np.ndarray]], stop: Any) -> float:
    """Pair the batches in turn until ``stop`` is set; pairings per second."""
    n, t0 = 0, time.perf_counter()
    while not stop.is_set():
        a, b = batches[n % len(batches)]
        C.auto_pairing_np(a, b, C.auto_chunk(len(a)))
        n += 1
    return n / (time.perf_counter() - t0)


class Pairing:
    """A background thread that pairs batches until stopped; ``rate`` is pairings per second."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.batches, self.rate = batches, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ot-pairing")

    def _run(self) -> None:
        self.rate = pair_until(self.batches, self._stop)

    def __enter__(self) -> Pairing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class IdlePairing(Pairing):
    """:class:`Pairing` at Linux's ``SCHED_IDLE`` priority: it runs only on an otherwise idle core."""

    def _run(self) -> None:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        super()._run()


def _process_main(batches: list[tuple[np.ndarray, np.ndarray]], stop: Any, rate: Any) -> None:
    """A pairing process (as :class:`Pairing`'s thread, without sharing the GIL)."""
    torch.set_num_threads(1)
    rate.value = pair_until(batches, stop)


class PairingProcess:
    """:class:`Pairing` in a separate process (spawned; started and warmed up before training)."""

    def __init__(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        ctx = mp.get_context("spawn")
        self._stop, self._rate = ctx.Event(), ctx.Value("d", 0.0)
        self._proc = ctx.Process(target=_process_main, args=(batches, self._stop, self._rate))
        self.rate = 0.0

    def __enter__(self) -> PairingProcess:
        self._proc.start()
        time.sleep(3.0)  # its imports
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join()
        self.rate = float(self._rate.value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads of the full step")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=800, help="training steps per measurement")
    ap.add_argument("--pairing-seconds", type=float, default=3.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = problems(4, 1024, 0)
    cfg = TrainConfig.for_method("fm", data="checkerboard", steps=args.steps, n_val=500, n_test=500)
    setups = [(args.threads, ""), (1, ""), (1, "thread"), (1, "process"), (args.threads, "thread")]
    if hasattr(os, "SCHED_IDLE"):
        setups.append((args.threads, "idle-priority thread"))
    steps: dict[tuple[int, str], list[float]] = {s: [] for s in setups}
    rates: dict[tuple[int, str], list[float]] = {s: [] for s in setups}
    alone: list[float] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        warm = TrainConfig.for_method("fm", data="checkerboard", steps=50, n_val=500, n_test=500)
        train(warm, Path(tmp) / "warm")
        for rnd in range(args.rounds):
            for threads, background in setups:
                torch.set_num_threads(threads)
                run = Path(tmp) / f"r{rnd}t{threads}{background}"
                if background:
                    worker: Pairing | PairingProcess = (
                        PairingProcess(batches) if background == "process"
                        else IdlePairing(batches) if background.startswith("idle")
                        else Pairing(batches)
                    )  # fmt: skip
                    with worker:
                        result = train(cfg, run)
                    rates[(threads, background)].append(worker.rate)
                else:
                    result = train(cfg, run)
                steps[(threads, background)].append(
                    cfg.steps / result.history[0]["seconds_optimize"]
                )
            torch.set_num_threads(args.threads)
            with Pairing(batches) as pairing:
                time.sleep(args.pairing_seconds)
            alone.append(pairing.rate)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    full = statistics.median(steps[setups[0]])
    rows: list[dict[str, Any]] = []
    for threads, background in setups:
        s = steps[(threads, background)]
        rows.append({
            "setup": f"{threads} thread(s)"
            + (f" + pairing in a background {background}" if background else " alone"),
            "steps_per_s": statistics.median(s), "min": min(s), "max": max(s),
            "vs_full_alone": statistics.median(s) / full,
            "pairings_per_s": statistics.median(rates[(threads, background)]) if background else None,
        })  # fmt: skip
    rows.append({"setup": "pairing alone", "steps_per_s": None, "min": None, "max": None,
                 "vs_full_alone": None, "pairings_per_s": statistics.median(alone)})  # fmt: skip
    info = {**machine(), "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
            "load_before": load_before, "load_after": os.getloadavg()}  # fmt: skip
    print(f"machine: {info}\n")
    print(table(rows, ["setup", "steps_per_s", "min", "max", "vs_full_alone", "pairings_per_s"]))
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
