"""Conditioning of velocity networks through keyword arguments.

A velocity network is called as ``v(x, t, **cond)``: ``x`` of shape ``(B, *E)``, ``t`` a 0-dim
tensor (inside ODE solvers) or ``(B,)`` (training losses), and ``cond`` per-row tensors such as class
labels ``y`` of shape ``(B,)``. The network holds no conditioning state: inside
``with conditioning(y=labels):`` every :class:`~iterflow.core.flow.Block` passes the rows of the bound
tensors that belong to the batch it integrates, so every map of a :class:`~iterflow.core.flow.Flow`
(``sample``, ``encode``, ``log_prob``, ...) and every training loss becomes conditional without
changing its signature.

Rows. The bound tensors have ``N`` rows; a velocity called on ``B`` rows gets all of them when
``B = N``, and this process's shard :func:`~iterflow.core.distributed.local_rows` of them when
``B`` is the size of that shard (data-parallel training computes only its own rows of the global
batch). Any other ``B`` is an error: bind the rows of each chunk you integrate.

Example:
    >>> import torch
    >>> from iterflow.core.flow import Block, Flow
    >>> class Shift(torch.nn.Module):  # dx/ds = y: a velocity conditioned on a per-row value
    ...     def forward(self, x, t, y):
    ...         return y[:, None].expand_as(x)
    >>> flow = Flow([Block(Shift())], (2,))
    >>> with conditioning(y=torch.tensor([0.0, 1.0])):
    ...     flow.encode(torch.zeros(2, 2), solver="euler", steps=1)
    tensor([[0., 0.],
            [1., 1.]])
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from iterflow.core.distributed import local_rows
from iterflow.errors import fail

_BOUND: contextvars.ContextVar[dict[str, Tensor] | None] = contextvars.ContextVar(
    "iterflow_conditioning", default=None
)


@contextmanager
def conditioning(**cond: Tensor) -> Iterator[None]:
    """Pass ``cond`` (per-row tensors, all with the same number of rows) as keyword arguments to
    every velocity network called inside the ``with`` body (see the module docstring).

    Arguments:
        **cond: name -> ``(N, ...)`` tensor; no arguments: unconditional (clears an outer binding).

    Raises:
        InputError: (argument ``cond``) a value that is not a tensor with a leading row dimension,
            or tensors with different numbers of rows.
    """
    rows = None
    for name, value in cond.items():
        if not isinstance(value, Tensor) or value.ndim == 0:
            fail("cond", f"{name!r} must be a tensor with one row per sample", value)
        if rows is not None and value.shape[0] != rows:
            fail(
                "cond",
                f"every tensor must have {rows} rows like the first; {name!r} has",
                value.shape[0],
            )
        rows = value.shape[0]
    token = _BOUND.set(dict(cond) or None)
    try:
        yield
    finally:
        _BOUND.reset(token)


def bound_rows(batch: int) -> dict[str, Tensor]:
    """The keyword arguments of a velocity called on ``batch`` rows: the bound tensors' rows for
    this batch (``{}`` outside :func:`conditioning`)."""
    cond = _BOUND.get()
    if not cond:
        return {}
    n = next(iter(cond.values())).shape[0]
    if n == batch:
        return cond
    shard = local_rows(n)  # data-parallel training: this rank's rows of the global batch
    if shard.stop - shard.start == batch:
        return {k: v[shard] for k, v in cond.items()}
    fail("cond", f"must have one row per sample of the batch ({batch} rows)", n)
