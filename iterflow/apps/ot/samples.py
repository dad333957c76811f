"""Sample sets of the transport and density-ratio applications: checks, minibatches, normalisation and
the fingerprint that identifies a run's data (so that a folder is only resumed on the same data)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from iterflow.errors import check_finite, fail
from iterflow.train import standardization


def check_points(x: Any, argument: str, dim: int | None = None) -> Tensor:
    """``x`` as a finite floating-point tensor of shape ``(n, d)`` with ``n >= 1`` (and ``d == dim``
    when given); errors name ``argument``."""
    if not isinstance(x, Tensor):
        fail(argument, "must be a torch.Tensor", type(x).__name__)
    if x.ndim != 2 or x.shape[0] < 1 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        fail(argument, f"must have shape {want} with n >= 1", tuple(x.shape))
    if not x.is_floating_point():
        fail(argument, "must be a floating-point tensor", str(x.dtype))
    check_finite(x, argument)
    return x


def draw_rows(bank: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rows of ``bank`` ``(m, ...)`` drawn uniformly with replacement (indices drawn on the
    generator's device)."""
    idx = torch.randint(0, bank.shape[0], (n,), generator=generator, device=generator.device)
    return bank[idx.to(bank.device)]


def evenly(x: Tensor, k: int) -> Tensor:
    """At most ``k`` rows of ``x``, evenly spaced (all of them when ``x`` has no more than ``k``)."""
    if x.shape[0] <= k:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, k).round().long().to(x.device)]


def pooled_standardization(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation ``(d,)`` of the pooled samples (floored at 1e-6)."""
    return standardization(torch.cat([source, target]), "dim")


def fingerprint(*tensors: Tensor) -> str:
    """A short SHA-256 of the shapes, dtypes and values of ``tensors`` (identifies a run's data)."""
    h = hashlib.sha256()
    for t in tensors:
        c = t.detach().cpu().contiguous()
        h.update(f"{tuple(c.shape)}/{c.dtype};".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def generator_fingerprint(generator: torch.Generator) -> str:
    """A short SHA-256 of a generator's state (identifies the seed a run started from)."""
    return hashlib.sha256(generator.get_state().cpu().numpy().tobytes()).hexdigest()[:16]
