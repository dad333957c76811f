"""Precision, recall, density and coverage of generated samples against real ones (k-NN manifolds).

References:
    Kynkäänniemi et al., "Improved Precision and Recall Metric ...", arXiv:1904.06991;
    Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", arXiv:2002.09797.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from iterflow.errors import fail
from iterflow.metrics.clouds import check_int, chunk_rows, point_pair, sq_dists, subsample
from iterflow.metrics.neighbors import knn

__all__ = ["PRDC_KEYS", "precision_recall_density_coverage"]

#: Keys of :func:`precision_recall_density_coverage`'s result, in order.
PRDC_KEYS: tuple[str, ...] = ("precision", "recall", "density", "coverage")


def _knn_radius_sq(x: Tensor, k: int, chunk: int) -> Tensor:
    """Squared distance of each row of ``x`` to its ``k``-th nearest *other* row, ``(n,)``.

    The neighbour is found by :func:`knn`; the squared distance is recomputed from the coordinate
    differences (the same formula :func:`_prdc_counts` uses on near-ties, so that a point at exactly
    the radius compares equal to it).
    """
    idx, _ = knn(x, x, k=k, chunk=chunk, exclude_self=True)
    far = idx[:, k - 1]
    return torch.cat(
        [((x[s : s + chunk] - x[far[s : s + chunk]]) ** 2).sum(1) for s in range(0, len(x), chunk)]
    )


def _prdc_counts(
    real: Tensor, fake: Tensor, real_r2: Tensor, fake_r2: Tensor, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunked pass over the fake x real squared distances.

    Returns ``(balls, recall_hit, min_d2)``: for each fake point the number of real k-NN balls
    that hold it ``(m,)``; for each real point whether some fake k-NN ball holds it ``(n,)``; and
    each real point's squared distance to its nearest fake point ``(n,)``. Distances come from the
    matmul expansion; every entry within its rounding error of a radius it is compared with is
    recomputed from the coordinate differences, so ties are decided exactly.
    """
    n = real.shape[0]
    eps = torch.finfo(real.dtype).eps
    margin_scale = 4.0 * (real.shape[1] + 2) * eps
    a2, b2 = (real * real).sum(1), (fake * fake).sum(1)
    balls = torch.zeros(fake.shape[0], dtype=torch.long, device=real.device)
    recall_hit = torch.zeros(n, dtype=torch.bool, device=real.device)
    min_d2 = torch.full((n,), math.inf, dtype=real.dtype, device=real.device)
    rows = max(1, min(chunk, chunk_rows(n)))
    piece = chunk_rows(real.shape[1])
    for s in range(0, fake.shape[0], rows):
        f, fr2 = fake[s : s + rows], fake_r2[s : s + rows, None]
        d2 = sq_dists(f, real)  # (r, n)
        margin = margin_scale * (b2[s : s + rows, None] + a2[None, :])
        near = ((d2 - real_r2[None, :]).abs() <= margin) | ((d2 - fr2).abs() <= margin)
        ri, ci = near.nonzero(as_tuple=True)
        for p in range(0, ri.shape[0], piece):
            r, c = ri[p : p + piece], ci[p : p + piece]
            d2[r, c] = ((f[r] - real[c]) ** 2).sum(1)
        balls[s : s + rows] = (d2 < real_r2[None, :]).sum(1)
        recall_hit |= (d2 < fr2).any(0)
        min_d2 = torch.minimum(min_d2, d2.min(0).values)
    return balls, recall_hit, min_d2


def precision_recall_density_coverage(
    real: Tensor,
    fake: Tensor,
    k: int = 5,
    max_points: int = 10_000,
    seed: int = 0,
    chunk: int = 1024,
) -> dict[str, float]:
    r"""Precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020).

    Each set's manifold is the union of balls ``B(p, NND_k(p))`` around its points, ``NND_k(p)``
    the distance to the ``k``-th nearest other point of the same set. With real points ``X_i``
    (``n``) and fake points ``Y_j`` (``m``):

    .. math::
        \mathrm{precision} = \frac1m \sum_j 1\big[\exists i: |Y_j - X_i| < \mathrm{NND}_k(X_i)\big],
        \qquad
        \mathrm{recall} = \frac1n \sum_i 1\big[\exists j: |X_i - Y_j| < \mathrm{NND}_k(Y_j)\big],

        \mathrm{density} = \frac1{km} \sum_j \sum_i 1\big[|Y_j - X_i| < \mathrm{NND}_k(X_i)\big],
        \qquad
        \mathrm{coverage} = \frac1n \sum_i 1\big[\min_j |X_i - Y_j| < \mathrm{NND}_k(X_i)\big].

    Precision and density measure fidelity (fake points fall where real data lies; density counts
    how many real balls hold each fake point, so it is ``~1`` when the two distributions agree and
    can exceed 1), recall and coverage measure diversity (the real data is reached; a dropped mode
    lowers both, not precision). Coverage and density use only the real manifold, so they are
    robust to fake outliers. Balls are open (strict ``<``, as in the authors' code): identical sets
    give precision = recall = coverage = 1 and density exactly 1 when no point has ``k`` exact
    duplicates. Distances are Euclidean in the given coordinates, so standardise features of
    different scales first.

    Computed in float64 on the inputs' device, in chunks (memory ``~ chunk x n``, never ``m x n``),
    after centring both sets on the real mean; ties at a ball's radius are decided on exact
    coordinate differences. Sets larger than ``max_points`` are subsampled without replacement by
    a generator seeded with ``seed`` (deterministic).

    Arguments:
        real: reference points, shape ``(n, ...)``, flattened to ``(n, d)``.
        fake: generated points, shape ``(m, ...)``, same flattened dimension.
        k: neighbour order of the ball radii, ``1 <= k < min(n, m)`` (5 in both papers).
        max_points: largest number of points kept from each set.
        seed: seed of the subsampling generator.
        chunk: block size of the neighbour searches.

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` (:data:`PRDC_KEYS`) as floats.

    References:
        Kynkäänniemi, Karras, Laine, Lehtinen & Aila, "Improved Precision and Recall Metric for
        Assessing Generative Models", arXiv:1904.06991; Naeem, Oh, Uh, Choi & Yoo, "Reliable
        Fidelity and Diversity Metrics for Generative Models", arXiv:2002.09797.

    Example:
        >>> import torch
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> precision_recall_density_coverage(x, x)
        {'precision': 1.0, 'recall': 1.0, 'density': 1.0, 'coverage': 1.0}
    """
    x, y = point_pair(real, fake, names=("real", "fake"))
    check_int(k, "k", 1)
    check_int(max_points, "max_points", 2)
    check_int(seed, "seed", 0)
    check_int(chunk, "chunk", 1)
    g = torch.Generator().manual_seed(seed)
    x = subsample(x, max_points, g).double()
    y = subsample(y, max_points, g).double()
    smallest = min(x.shape[0], y.shape[0])
    if k >= smallest:
        fail("k", f"must be smaller than the number of points of each set ({smallest})", k)
    centre = x.mean(0, keepdim=True)
    x, y = x - centre, y - centre
    real_r2 = _knn_radius_sq(x, k, chunk)
    fake_r2 = _knn_radius_sq(y, k, chunk)
    balls, recall_hit, min_d2 = _prdc_counts(x, y, real_r2, fake_r2, chunk)
    return {
        "precision": float((balls > 0).double().mean()),
        "recall": float(recall_hit.double().mean()),
        "density": float(balls.sum().double() / (k * y.shape[0])),
        "coverage": float((min_d2 < real_r2).double().mean()),
    }
