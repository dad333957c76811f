"""Point clouds as the metrics take them: validation, pairwise squared distances, chunking, subsamples.

Every metric of :mod:`iterflow.metrics` reads its inputs through :func:`point_cloud` /
:func:`point_pair` (tensors or arrays ``(n, ...)`` flattened to ``(n, d)``, validated, failures
raising :class:`~iterflow.errors.InputError` naming the argument) and computes pairwise distances
in blocks of at most :data:`BLOCK_ENTRIES` entries (:func:`chunk_rows`), so large sets never need
an ``n x m`` matrix in memory at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from iterflow.errors import check_finite, fail

__all__ = [
    "BLOCK_ENTRIES",
    "check_int",
    "chunk_rows",
    "evenly_spaced",
    "point_cloud",
    "point_pair",
    "sq_dists",
    "subsample",
]

#: Largest number of entries of one pairwise block (rows x cols) held in memory at a time.
BLOCK_ENTRIES = 2**22


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def point_cloud(x: Tensor | np.ndarray, argument: str, min_points: int = 2) -> Tensor:
    """Validate one point cloud and return it flattened to ``(n, d)`` with a floating dtype."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        fail(
            argument, "must be a torch.Tensor (or numpy array) of shape (n, ...)", type(x).__name__
        )
    if x.dim() == 0:
        fail(argument, "must have shape (n, ...) with a leading point dimension", tuple(x.shape))
    if x.is_complex():
        fail(argument, "must be real-valued", x.dtype)
    if x.shape[0] < min_points:
        fail(argument, f"must hold at least {min_points} points along dim 0", tuple(x.shape))
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    check_finite(x, argument)
    return x.reshape(x.shape[0], -1)


def point_pair(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, names: tuple[str, str] = ("x", "y")
) -> tuple[Tensor, Tensor]:
    """Validate two point clouds: same flattened dimension and device; promote to a common dtype."""
    xf, yf = point_cloud(x, names[0]), point_cloud(y, names[1])
    if xf.shape[1] != yf.shape[1]:
        fail(
            names[1],
            f"must have the same number of features per point as {names[0]} "
            f"({names[0]} has {xf.shape[1]})",
            f"{yf.shape[1]} features",
        )
    if xf.device != yf.device:
        fail(names[1], f"must be on the same device as {names[0]} ({xf.device})", str(yf.device))
    dtype = torch.promote_types(xf.dtype, yf.dtype)
    return xf.to(dtype), yf.to(dtype)


def check_int(value: int, argument: str, minimum: int) -> None:
    """Raise :class:`~iterflow.errors.InputError` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(argument, f"must be an integer >= {minimum}", value)


# ----------------------------------------------------------------------------------------------
# pairwise helpers
# ----------------------------------------------------------------------------------------------


def sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``|a_i - b_j|^2`` of ``a (p, d)`` and ``b (q, d)`` -> ``(p, q)``.

    Uses the expansion ``|a|^2 + |b|^2 - 2 a.b`` (one matmul), clamped at zero.
    """
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0)


def chunk_rows(n_cols: int) -> int:
    """Rows of a block with ``n_cols`` columns that keep it within :data:`BLOCK_ENTRIES` entries."""
    return max(1, BLOCK_ENTRIES // max(1, n_cols))


def evenly_spaced(x: Tensor, k: int) -> Tensor:
    """At most ``k`` rows of ``x`` at evenly spaced indices (deterministic subsample)."""
    if x.shape[0] <= k:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, k, device=x.device).round().long()
    return x[idx]


def subsample(x: Tensor, max_n: int, generator: torch.Generator) -> Tensor:
    """At most ``max_n`` rows of ``x`` drawn without replacement."""
    if x.shape[0] <= max_n:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_n]
    return x[idx.to(x.device)]
