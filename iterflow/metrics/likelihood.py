"""Likelihood units: a negative log-likelihood in nats per sample as bits per dimension."""

from __future__ import annotations

import math

from torch import Tensor

from iterflow.errors import check_finite, fail
from iterflow.metrics.clouds import check_int

__all__ = ["bits_per_dim"]


def bits_per_dim(nll_nats: float | Tensor, dim: int) -> float:
    r"""Convert a negative log-likelihood in nats per sample to bits/dim: ``nll / (d ln 2)``.

    Arguments:
        nll_nats: NLL in nats per sample — a number, or a tensor of per-sample NLLs (averaged).
            Any dequantisation / rescaling of discrete data must already be accounted for.
        dim: data dimension ``d`` (e.g. ``C * H * W``).

    Returns:
        Bits per dimension.
    """
    check_int(dim, "dim", 1)
    if isinstance(nll_nats, Tensor):
        if nll_nats.numel() == 0:
            fail("nll_nats", "must hold at least one value", tuple(nll_nats.shape))
        check_finite(nll_nats, "nll_nats")
        value = float(nll_nats.double().mean())
    elif isinstance(nll_nats, (int, float)) and not isinstance(nll_nats, bool):
        value = float(nll_nats)
        if not math.isfinite(value):
            fail("nll_nats", "must be finite", nll_nats)
    else:
        fail("nll_nats", "must be a number or a torch.Tensor", type(nll_nats).__name__)
    return value / (dim * math.log(2.0))
