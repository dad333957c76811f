"""Wasserstein distances between empirical measures: exact W2 (network simplex) and sliced W2.

References:
    Peyré & Cuturi, "Computational Optimal Transport", arXiv:1803.00567.
    Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015.
"""

from __future__ import annotations

import math

import numpy as np
import ot
import scipy.spatial.distance
import torch
from torch import Tensor

from iterflow.metrics.clouds import check_int, chunk_rows, point_pair, subsample

__all__ = ["sliced_w2", "w2"]


def w2(x: Tensor, y: Tensor, max_n: int = 2000, seed: int = 0) -> float:
    r"""Exact 2-Wasserstein distance between the empirical measures of (subsamples of) x and y.

    .. math::
        W_2(\hat P, \hat Q)
          = \Big(\min_{\pi \in \Pi(a, b)} \sum_{ij} \pi_{ij} |x_i - y_j|^2\Big)^{1/2}

    with uniform weights ``a = 1/n``, ``b = 1/m``, solved as a linear program by POT's network
    simplex (``ot.emd2``) in float64. Each input is first subsampled without replacement to at most
    ``max_n`` points (the LP costs ``O(n^3)``); the result is then an estimate of ``W_2(P, Q)`` with
    a positive bias that shrinks as ``max_n`` grows.

    Arguments:
        x: samples of P, shape ``(n, ...)``.
        y: samples of Q, shape ``(m, ...)``, same flattened dimension.
        max_n: largest number of points kept from each input.
        seed: seed of the ``torch.Generator`` that draws the subsamples.

    Returns:
        ``W_2`` (not squared).

    References:
        Peyré & Cuturi, "Computational Optimal Transport", arXiv:1803.00567, ch. 3.
    """
    x, y = point_pair(x, y)
    check_int(max_n, "max_n", 2)
    check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    xs = subsample(x, max_n, g).detach().cpu().double().numpy()
    ys = subsample(y, max_n, g).detach().cpu().double().numpy()
    cost = scipy.spatial.distance.cdist(xs, ys, metric="sqeuclidean")
    a = np.full(xs.shape[0], 1.0 / xs.shape[0])
    b = np.full(ys.shape[0], 1.0 / ys.shape[0])
    w2_sq = float(ot.emd2(a, b, cost, numItermax=max(100_000, 50 * xs.shape[0] * ys.shape[0])))
    return math.sqrt(max(w2_sq, 0.0))


def _w2_sq_1d_sorted(xs: Tensor, ys: Tensor) -> Tensor:
    r"""Squared 1-D W2 of uniform empirical measures per row of sorted ``xs (p, n)``, ``ys (p, m)``.

    ``W_2^2 = \int_0^1 (F_x^{-1}(u) - F_y^{-1}(u))^2 du``; both quantile functions are piecewise
    constant on the merged grid ``{i/n} ∪ {j/m}``, so the integral is an exact finite sum.
    Returns ``(p,)``.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return ((xs - ys) ** 2).mean(1)
    dev = xs.device
    f64 = torch.float64
    levels = torch.cat(
        [
            torch.zeros(1, dtype=f64, device=dev),
            torch.arange(1, n + 1, dtype=f64, device=dev) / n,
            torch.arange(1, m + 1, dtype=f64, device=dev) / m,
        ]
    )
    levels = torch.unique(levels)  # sorted
    widths = levels.diff()  # (L,)
    mid = 0.5 * (levels[1:] + levels[:-1])
    ix = (mid * n).floor().long().clamp_max(n - 1)
    iy = (mid * m).floor().long().clamp_max(m - 1)
    diff = xs[:, ix] - ys[:, iy]  # (p, L)
    return (diff.double() ** 2 * widths).sum(1)


def sliced_w2(x: Tensor, y: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    r"""Monte-Carlo sliced 2-Wasserstein distance, cheap for large ``n`` and high ``d``.

    .. math::
        SW_2(P, Q) = \Big(\mathbb E_{\theta \sim U(S^{d-1})}\,
          W_2^2(\theta_\# P, \theta_\# Q)\Big)^{1/2},

    with ``n_projections`` directions drawn from a seeded ``torch.Generator``; each 1-D ``W_2`` is
    exact (sorting; unequal sample sizes handled through the quantile functions). Cost
    ``O(L (n + m) log(n + m))`` for ``L`` projections. For a translate ``Q = P + s``,
    ``SW_2 = |s| / sqrt(d)`` in expectation over directions; in ``d = 1`` it equals :func:`w2`.

    Arguments:
        x: samples of P, shape ``(n, ...)``.
        y: samples of Q, shape ``(m, ...)``, same flattened dimension.
        n_projections: number of random directions ``L``.
        seed: seed of the generator drawing the directions.

    Returns:
        ``SW_2`` (not squared).

    References:
        Bonneel, Rabin, Peyré & Pfister, "Sliced and Radon Wasserstein Barycenters of Measures",
        J. Math. Imaging Vis. 51, 2015.
    """
    x, y = point_pair(x, y)
    check_int(n_projections, "n_projections", 1)
    check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, x.shape[1], generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    total = 0.0
    step = chunk_rows(x.shape[0] + y.shape[0])
    for start in range(0, n_projections, step):
        th = theta[start : start + step]  # (p, d)
        xs = (th @ x.T).sort(dim=1).values  # (p, n)
        ys = (th @ y.T).sort(dim=1).values  # (p, m)
        total += float(_w2_sq_1d_sorted(xs, ys).sum())
    return math.sqrt(max(total / n_projections, 0.0))
