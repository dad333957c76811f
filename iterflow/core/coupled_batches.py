"""Minibatches of coupled pairs, each coupled one step ahead in a background thread or in line.

A minibatch-OT coupling (:func:`iterflow.core.couplings.ot_permutation`) is host-side NumPy/SciPy
work that does not depend on the network: the pairing of step ``k + 1`` can be computed while step
``k`` trains. :class:`CoupledBatches` is a batch source of the loop
(:data:`iterflow.train.loop.BatchSource`, a callable) that returns step ``k``'s pairs ``(x0, x1)``
and starts step ``k + 1``'s in a worker thread. While it runs ahead, PyTorch gets one thread fewer
(the coupling has a core of its own; two threads of PyTorch and the coupling on two cores slow each
other down); :meth:`CoupledBatches.close` restores the count. With ``ahead=False`` each step's pairs
are made in line, on the step's own thread, and PyTorch keeps all its threads: flow matching's
choice where the compiled pairing serves a CPU run (:func:`iterflow.methods.fm.inline_pairing`),
which takes a fraction of a step, so a thread taken from the step would cost more than it saves
(``benchmarks/bench_speed.py``'s OT rows: both designs, against independent pairs).

Randomness. Step ``k``'s rows and noise come from a generator seeded with ``(seed, k)`` alone, so
pairs do not depend on the timing of the threads, a resumed stage (:meth:`CoupledBatches.start_at`)
draws exactly the pairs an uninterrupted one would, and data-parallel ranks (same seed) agree.
``benchmarks/bench_speed.py`` measures the throughput against plain (independent) training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from iterflow.core.seeds import derived_seed

#: ``pair(x0, x1) -> x1 re-ordered``: the coupling of one minibatch.
Pairing = Callable[[Tensor, Tensor], Tensor]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s draws (:func:`iterflow.core.seeds.derived_seed`)."""
    return derived_seed(seed, step, "pairs")


def background_cores() -> int:
    """CPU cores this process may run on (1 where the platform cannot tell)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class CoupledBatches:
    """Batch source of coupled pairs ``(x0 rows of data, x1 noise re-paired by pair)``.

    Arguments:
        data: ``(N, *E)`` rows that ``x0`` is drawn from (uniformly, with replacement).
        pair: the coupling of one minibatch.
        seed: the seed of every step's draws (:func:`step_seed`).
        ahead: compute the next step's pairs in a background thread (default: when this process
            has at least two cores).
    """

    def __init__(
        self, data: Tensor, pair: Pairing, seed: int, *, ahead: bool | None = None
    ) -> None:
        self.data, self.pair, self.seed = data, pair, int(seed)
        self.ahead = background_cores() >= 2 if ahead is None else bool(ahead)
        self.step = 0
        self._pending: tuple[int, int, Future[tuple[Tensor, Tensor]]] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._threads: int | None = None

    def start_at(self, step: int) -> None:
        """Continue from ``step`` (0, or the step a resumed stage starts from)."""
        self.step = int(step)

    def make(self, step: int, batch_size: int) -> tuple[Tensor, Tensor]:
        """Step ``step``'s pairs: ``batch_size`` data rows, as many noise rows, coupled."""
        g = torch.Generator(device=self.data.device).manual_seed(step_seed(self.seed, step))
        size = min(batch_size, self.data.shape[0])
        idx = torch.randint(0, self.data.shape[0], (size,), generator=g, device=self.data.device)
        x0 = torch.index_select(self.data, 0, idx)  # = data[idx], faster (train/loop.py's draw)
        x1 = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        return x0, self.pair(x0, x1)

    def __call__(self, generator: torch.Generator, batch_size: int) -> tuple[Tensor, Tensor]:
        """The current step's pairs (the loop's ``generator`` is not used: see the module doc)."""
        del generator
        k, self.step = self.step, self.step + 1
        pending, self._pending = self._pending, None
        if pending is not None and pending[:2] == (k, batch_size):
            out = pending[2].result()
        else:
            if pending is not None:
                pending[2].result()  # a stale prefetch (after a resume): let it finish
            out = self.make(k, batch_size)
        if self.ahead:
            self._pending = (k + 1, batch_size, self._worker().submit(self.make, k + 1, batch_size))
        return out

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="iterflow-coupling")
            self._threads = torch.get_num_threads()
            if self._threads >= 2:
                torch.set_num_threads(self._threads - 1)  # the coupling takes one core
        return self._pool

    def close(self) -> None:
        """Stop the worker and give PyTorch its threads back (the loop calls it at the end)."""
        if self._pending is not None:
            self._pending[2].result()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None
