"""Data-parallel training on PyTorch's own ``torch.distributed`` (launched by ``torchrun``).

The trainer (:func:`iterflow.train.train`) calls :func:`setup`: under ``torchrun`` (``WORLD_SIZE > 1``
in the environment) it joins the process group (``nccl`` on GPUs, ``gloo`` on CPUs) and returns a
:class:`DistContext`; in a plain process it returns ``None`` and nothing changes.

Equivalence with one process. Every rank draws the *global* minibatch (indices, noise, times) from
identically seeded generators and keeps only its own contiguous slice of rows (:func:`local_rows`)
for the network's forward and backward passes. Each rank's loss is its rows' share of the global mean
(:func:`row_mean`); the loop (:func:`iterflow.train.loop.optimize`) averages the gradients over the
ranks with one all-reduce, so the averaged gradient is the gradient of the global mean loss — the
same update as one process with the same global batch, up to floating-point summation order. No
``DistributedDataParallel`` wrapper is needed, so any ``nn.Module`` trains data-parallel. Minibatch
couplings (OT) are computed on the global batch before the slicing. Progressive methods push their
cached particles shard by shard and :func:`all_gather_rows`. Rank 0 alone writes the run folder.

GPUs (one process per GPU; the global batch is ``--batch-size``, split across the ranks)::

    torchrun --standalone --nproc_per_node 8 "$(which iterflow)" train --device cuda --out run

Several machines: ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29400 "$(which iterflow)" train ...`` with the run folder on a shared file
system. CPUs: the same with ``--device cpu`` (gloo).
"""

from __future__ import annotations

import atexit
import contextvars
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel job.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        backend: ``"gloo"`` or ``"nccl"``.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of a length-``n`` batch owned by this rank (see :func:`shard_bounds`)."""
        return shard_bounds(n, self.rank, self.world_size)


_SHARD: contextvars.ContextVar[DistContext | None] = contextvars.ContextVar(
    "iterflow_shard", default=None
)


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> DistContext | None:
    """Join the ``torchrun`` process group when there is one, else return ``None``.

    Uses an already initialised default group if the caller made one. The backend is ``nccl`` for
    CUDA devices and ``gloo`` otherwise; on CUDA each process uses the GPU ``LOCAL_RANK``.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if env_world_size() <= 1:
            return None
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(shutdown)
    if dist.get_world_size() <= 1:
        return None
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def shutdown() -> None:
    """Leave the process group (registered at exit by :func:`setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 or outside a distributed job (use it to decide who prints and writes)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx is not None:
        dist.barrier()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous rows ``[start, stop)`` of ``n`` owned by ``rank``: sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@contextmanager
def sharding(ctx: DistContext | None) -> Iterator[None]:
    """Inside the block, :func:`local_rows` and :func:`shard_mean` split batches over ``ctx``'s ranks."""
    token = _SHARD.set(ctx)
    try:
        yield
    finally:
        _SHARD.reset(token)


def local_rows(n: int) -> slice:
    """The slice of a global batch of ``n`` rows that this rank computes (all rows when not sharded)."""
    ctx = _SHARD.get()
    if ctx is None:
        return slice(0, n)
    return slice(*ctx.bounds(n))


def row_mean(rows: Tensor, n: int, ctx: DistContext | None) -> Tensor:
    """This rank's share of the mean of per-row values over a global batch of ``n`` rows.

    ``rows`` ``(b,)`` holds this rank's rows (all ``n`` in one process, where this is
    ``rows.mean()``); averaged over the ranks it is the global mean, so the gradients averaged over
    the ranks are those of the one-process mean.
    """
    if ctx is None:
        return rows.mean()
    return rows.sum() * (ctx.world_size / n)


def all_gather_rows(local: Tensor, n: int, ctx: DistContext | None) -> Tensor:
    """Concatenate every rank's shard (rows :func:`shard_bounds`) back into the ``n``-row tensor.

    Shards are padded to the largest shard for the collective and trimmed afterwards.
    """
    if ctx is None:
        return local
    sizes = [b - a for a, b in (shard_bounds(n, r, ctx.world_size) for r in range(ctx.world_size))]
    biggest = max(sizes)
    pad = local.new_zeros((biggest - local.shape[0], *local.shape[1:]))
    parts = [local.new_empty((biggest, *local.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([local, pad]).contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_reduce_mean(values: dict[str, float], ctx: DistContext | None) -> dict[str, float]:
    """Average a dict of scalars over ranks (log lines report the global loss)."""
    if ctx is None or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if ctx.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t = (t / ctx.world_size).cpu()
    return {k: float(v) for k, v in zip(keys, t)}
