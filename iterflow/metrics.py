"""Sample-based metrics for generative models: discrepancies, precision/recall, entropy, bits/dim.

Every function takes point clouds as tensors of shape ``(n, ...)``; trailing dimensions are
flattened, so ``(n, C, H, W)`` images are points in ``R^(C*H*W)``. A 1-D tensor ``(n,)`` is ``n``
points in ``R^1``. NumPy arrays are accepted too. Inputs are validated (at least two points,
matching flattened dimension, finite values, same device) and failures raise
:class:`~iterflow.errors.InputError` naming the argument (``"x"``, ``"y"``, ...).

Heavy pairwise computations (MMD, nearest neighbours) run in row/column chunks on the inputs'
device, so ``10_000 x 10_000`` point pairs never need an ``n x m`` matrix in memory at once.
Scalars are returned as Python floats; sums are accumulated in float64.

References:
    Gretton et al., "A Kernel Two-Sample Test", JMLR 2012.
    Peyré & Cuturi, "Computational Optimal Transport", arXiv:1803.00567.
    Bonneel et al., "Sliced and Radon Wasserstein Barycenters of Measures", JMIV 2015.
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", arXiv:1706.08500 (FID).
    Kozachenko & Leonenko, "Sample estimate of the entropy of a random vector", 1987;
    Kraskov, Stögbauer & Grassberger, "Estimating mutual information", arXiv:cond-mat/0305641.
    Kynkäänniemi et al., "Improved Precision and Recall Metric ...", arXiv:1904.06991;
    Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", arXiv:2002.09797.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import ot
import scipy.linalg
import scipy.spatial.distance
import torch
from scipy.special import digamma
from torch import Tensor

from iterflow.errors import check_finite, fail

__all__ = [
    "DEFAULT_MMD_SCALES",
    "PRDC_KEYS",
    "bits_per_dim",
    "frechet_distance",
    "gaussian_kl_to_standard",
    "kl_to_standard_normal",
    "knn",
    "knn_entropy",
    "median_heuristic",
    "mmd",
    "nearest_neighbor_distance",
    "precision_recall_density_coverage",
    "sliced_w2",
    "w2",
]

#: Multipliers of the median pairwise distance used as Gaussian-kernel bandwidths by :func:`mmd`.
DEFAULT_MMD_SCALES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)

# Largest number of entries of one pairwise block (rows x cols) held in memory at a time.
_BLOCK_ENTRIES = 2**22
# Points per sample used by the median heuristic (evenly spaced, deterministic).
_MEDIAN_POINTS = 1000


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _points(x: Tensor | np.ndarray, argument: str, min_points: int = 2) -> Tensor:
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


def _pair(
    x: Tensor | np.ndarray, y: Tensor | np.ndarray, names: tuple[str, str] = ("x", "y")
) -> tuple[Tensor, Tensor]:
    """Validate two point clouds: same flattened dimension and device; promote to a common dtype."""
    xf, yf = _points(x, names[0]), _points(y, names[1])
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


def _check_int(value: int, argument: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(argument, f"must be an integer >= {minimum}", value)


# ----------------------------------------------------------------------------------------------
# pairwise helpers
# ----------------------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``|a_i - b_j|^2`` of ``a (p, d)`` and ``b (q, d)`` -> ``(p, q)``.

    Uses the expansion ``|a|^2 + |b|^2 - 2 a.b`` (one matmul), clamped at zero.
    """
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0)


def _chunk_rows(n_cols: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(1, n_cols))


def _evenly_spaced(x: Tensor, k: int) -> Tensor:
    """At most ``k`` rows of ``x`` at evenly spaced indices (deterministic subsample)."""
    if x.shape[0] <= k:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, k, device=x.device).round().long()
    return x[idx]


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------


def median_heuristic(x: Tensor, y: Tensor) -> float:
    """Median pairwise Euclidean distance of the pooled sample ``x ∪ y`` (distinct pairs only).

    Uses at most 1000 evenly spaced points of each input, so the value is deterministic.

    Arguments:
        x: points, shape ``(n, ...)``.
        y: points, shape ``(m, ...)``, same flattened dimension as ``x``.

    Returns:
        The median distance, or ``1.0`` if every pooled point coincides.
    """
    x, y = _pair(x, y)
    z = torch.cat([_evenly_spaced(x, _MEDIAN_POINTS), _evenly_spaced(y, _MEDIAN_POINTS)])
    d2 = _sq_dists(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1, device=z.device)
    med = float(d2[iu[0], iu[1]].median().sqrt())
    return med if med > 0.0 else 1.0


def _kernel_sum(a: Tensor, b: Tensor, inv_two_sigma2: Tensor, exclude_diagonal: bool) -> float:
    """``sum_ij sum_s exp(-|a_i - b_j|^2 / (2 sigma_s^2))`` in chunks, optionally without i == j."""
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    rows = _chunk_rows(b.shape[0])
    for start in range(0, a.shape[0], rows):
        d2 = _sq_dists(a[start : start + rows], b)  # (r, m)
        if exclude_diagonal:
            r = d2.shape[0]
            idx = torch.arange(r, device=a.device)
            d2[idx, idx + start] = float("inf")  # exp(-inf) = 0 removes k(a_i, a_i)
        for c in inv_two_sigma2:
            total += torch.exp(-d2 * c).sum(dtype=torch.float64)
    return float(total)


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> float:
    r"""Unbiased estimate of the squared maximum mean discrepancy with a sum of Gaussian kernels.

    .. math::
        k(a, b) = \sum_s \exp\!\big(-|a - b|^2 / (2\sigma_s^2)\big), \qquad
        \widehat{\mathrm{MMD}}^2_u = \frac{\sum_{i\ne j} k(x_i, x_j)}{n(n-1)}
          + \frac{\sum_{i\ne j} k(y_i, y_j)}{m(m-1)} - \frac{2\sum_{i,j} k(x_i, y_j)}{nm}.

    Being unbiased, the estimate fluctuates around 0 for equal distributions and **can be slightly
    negative**; it grows with any difference (e.g. a mean shift). Computed in chunks of rows, so
    ``10_000 x 10_000`` points need only a few tens of MB.

    Arguments:
        x: samples of P, shape ``(n, ...)``, ``n >= 2``.
        y: samples of Q, shape ``(m, ...)``, ``m >= 2``, same flattened dimension ``d``.
        bandwidths: kernel widths ``sigma_s``. Default: the median heuristic — the median pairwise
            distance ``h`` of the pooled sample (:func:`median_heuristic`) — times
            ``(0.25, 0.5, 1, 2, 4)`` (:data:`DEFAULT_MMD_SCALES`), i.e.
            ``sigma in {h/4, h/2, h, 2h, 4h}``. Report them with your numbers.

    Returns:
        The squared-MMD estimate (a float, possibly slightly negative).

    References:
        Gretton et al., "A Kernel Two-Sample Test", JMLR 13, 2012, Lemma 6.
    """
    x, y = _pair(x, y)
    if bandwidths is None:
        h = median_heuristic(x, y)
        bandwidths = [h * s for s in DEFAULT_MMD_SCALES]
    bw = list(bandwidths)
    if not bw or any(
        isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s)
        for s in bw
    ):
        fail("bandwidths", "must be a non-empty sequence of finite numbers > 0", bandwidths)
    c = torch.tensor([1.0 / (2.0 * s * s) for s in bw], dtype=x.dtype, device=x.device)
    n, m = x.shape[0], y.shape[0]
    kxx = _kernel_sum(x, x, c, exclude_diagonal=True) / (n * (n - 1))
    kyy = _kernel_sum(y, y, c, exclude_diagonal=True) / (m * (m - 1))
    kxy = _kernel_sum(x, y, c, exclude_diagonal=False) / (n * m)
    return kxx + kyy - 2.0 * kxy


# ----------------------------------------------------------------------------------------------
# Wasserstein distances
# ----------------------------------------------------------------------------------------------


def _subsample(x: Tensor, max_n: int, generator: torch.Generator) -> Tensor:
    """At most ``max_n`` rows of ``x`` drawn without replacement."""
    if x.shape[0] <= max_n:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:max_n]
    return x[idx.to(x.device)]


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
    x, y = _pair(x, y)
    _check_int(max_n, "max_n", 2)
    _check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    xs = _subsample(x, max_n, g).detach().cpu().double().numpy()
    ys = _subsample(y, max_n, g).detach().cpu().double().numpy()
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
    x, y = _pair(x, y)
    _check_int(n_projections, "n_projections", 1)
    _check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n_projections, x.shape[1], generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(device=x.device, dtype=x.dtype)
    total = 0.0
    step = _chunk_rows(x.shape[0] + y.shape[0])
    for start in range(0, n_projections, step):
        th = theta[start : start + step]  # (p, d)
        xs = (th @ x.T).sort(dim=1).values  # (p, n)
        ys = (th @ y.T).sort(dim=1).values  # (p, m)
        total += float(_w2_sq_1d_sorted(xs, ys).sum())
    return math.sqrt(max(total / n_projections, 0.0))


# ----------------------------------------------------------------------------------------------
# Gaussian fits
# ----------------------------------------------------------------------------------------------


def _mean_cov(x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(d,)`` and unbiased covariance ``(d, d)`` of ``x (n, d)`` in float64 numpy."""
    a = x.detach().cpu().double().numpy()
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def _trace_sqrt_product(c1: np.ndarray, c2: np.ndarray, eps: float) -> float:
    """``tr (C1 C2)^{1/2} = tr (C1^{1/2} C2 C1^{1/2})^{1/2}`` with a stable matrix square root."""
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    if not np.isfinite(covmean).all():  # singular product: regularise both covariances
        offset = eps * np.eye(c1.shape[0])
        covmean = scipy.linalg.sqrtm((c1 + offset) @ (c2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean.real).max()))
        if np.abs(covmean.imag).max() > 1e-6 * scale:
            return _trace_sqrt_product_sym(c1, c2)  # non-negligible imaginary part: go symmetric
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_sym(c1: np.ndarray, c2: np.ndarray) -> float:
    """Fallback: eigenvalues of the symmetric PSD matrix ``C1^{1/2} C2 C1^{1/2}``, clipped at 0."""
    w, v = np.linalg.eigh(c1)
    s1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    lam = np.linalg.eigvalsh(s1 @ c2 @ s1)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(feat_x: Tensor, feat_y: Tensor, eps: float = 1e-6) -> float:
    r"""Fréchet distance between Gaussian fits of two feature sets (the formula behind FID).

    With means ``m_1, m_2`` and unbiased covariances ``C_1, C_2`` of the two feature sets,

    .. math::
        d_F^2 = |m_1 - m_2|^2
          + \operatorname{tr}\big(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2}\big),

    the squared 2-Wasserstein distance between ``N(m_1, C_1)`` and ``N(m_2, C_2)`` — returned as
    is (squared, following the FID convention). ``tr (C_1 C_2)^{1/2}`` is computed with
    ``scipy.linalg.sqrtm``; if that is not finite (singular covariances) ``eps * I`` is added to
    both covariances, tiny imaginary parts are discarded, and a symmetric eigenvalue route is used
    if a large imaginary part remains. Tiny negative round-off is clipped to 0.

    **Not Inception FID**: with features from a locally trained network (or raw coordinates) the
    number is only comparable with other numbers computed on the same features; it must not be
    compared with published FID values, which use Inception-v3 pool features on 50k samples.

    Arguments:
        feat_x: features of the first set, shape ``(n, ...)``, flattened to ``(n, d)``.
        feat_y: features of the second set, shape ``(m, ...)``, same ``d``.
        eps: diagonal offset used only when the covariance product is singular.

    Returns:
        The (squared) Fréchet distance as a float ``>= 0``.

    References:
        Dowson & Landau, "The Fréchet distance between multivariate normal distributions", 1982;
        Heusel et al., arXiv:1706.08500.
    """
    x, y = _pair(feat_x, feat_y, names=("feat_x", "feat_y"))
    if not (isinstance(eps, (int, float)) and eps > 0):
        fail("eps", "must be a number > 0", eps)
    m1, c1 = _mean_cov(x)
    m2, c2 = _mean_cov(y)
    tr_sqrt = _trace_sqrt_product(c1, c2, float(eps))
    value = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)
    return max(value, 0.0)


def gaussian_kl_to_standard(x: Tensor) -> float:
    r"""``KL(N(m, C) || N(0, I))`` for the Gaussian fit of ``x``: a cheap "distance to noise" proxy.

    .. math::
        \mathrm{KL} = \tfrac12\big(\operatorname{tr} C + |m|^2 - d - \log\det C\big),

    with ``m`` the sample mean and ``C`` the unbiased sample covariance. Zero iff the first two
    moments match the standard normal; blind to non-Gaussian structure (use
    :func:`kl_to_standard_normal` in low dimension for that).

    Arguments:
        x: samples, shape ``(n, ...)``, flattened to ``(n, d)``.

    Returns:
        The KL in nats; ``inf`` if ``C`` is singular (for instance ``n <= d``).
    """
    x = _points(x, "x")
    m, c = _mean_cov(x)
    sign, logdet = np.linalg.slogdet(c)
    if sign <= 0:
        return math.inf
    return float(0.5 * (np.trace(c) + m @ m - c.shape[0] - logdet))


# ----------------------------------------------------------------------------------------------
# nearest neighbours and entropy
# ----------------------------------------------------------------------------------------------


def knn(
    queries: Tensor, reference: Tensor, k: int, chunk: int = 1024, exclude_self: bool = False
) -> tuple[Tensor, Tensor]:
    """Indices ``(n, k)`` and exact Euclidean distances ``(n, k)`` of the k nearest reference rows.

    Candidates are ranked with the matmul expansion (chunked over queries and reference); the
    distances of the selected neighbours are then recomputed directly as ``|q - r|`` so that
    near-duplicates get accurate (near-zero) distances. With ``exclude_self`` (``queries`` is
    ``reference``), each point's own index is skipped.

    Arguments:
        queries: ``(n, d)`` points; reference: ``(m, d)`` points (same dtype and device), ``m >= k``.
        k: neighbours per query, nearest first.
        chunk: block size along both sets (memory ``~ chunk^2`` entries).
        exclude_self: skip index ``i`` for query ``i`` (``queries`` is ``reference``).

    Returns:
        ``(indices, distances)``, both ``(n, k)``, sorted by increasing distance.

    Example:
        >>> import torch
        >>> idx, dist = knn(torch.tensor([[0.0], [2.9]]), torch.tensor([[0.0], [1.0], [3.0]]), k=1)
        >>> idx[:, 0].tolist(), [round(float(v), 4) for v in dist[:, 0]]
        ([0, 2], [0.0, 0.1])
    """
    n, m = queries.shape[0], reference.shape[0]
    best_d = torch.full((n, k), float("inf"), dtype=queries.dtype, device=queries.device)
    best_i = torch.zeros((n, k), dtype=torch.long, device=queries.device)
    for qs in range(0, n, chunk):
        q = queries[qs : qs + chunk]
        bd, bi = best_d[qs : qs + chunk], best_i[qs : qs + chunk]
        for rs in range(0, m, chunk):
            d2 = _sq_dists(q, reference[rs : rs + chunk])  # (cq, cr)
            if exclude_self:
                rows = torch.arange(q.shape[0], device=q.device)
                cols = rows + qs - rs
                ok = (cols >= 0) & (cols < d2.shape[1])
                d2[rows[ok], cols[ok]] = float("inf")
            cand_d = torch.cat([bd, d2], dim=1)
            cand_i = torch.cat(
                [bi, torch.arange(rs, rs + d2.shape[1], device=q.device).expand_as(d2)], 1
            )
            top = cand_d.topk(k, dim=1, largest=False)
            bd, bi = top.values, cand_i.gather(1, top.indices)
        best_d[qs : qs + chunk], best_i[qs : qs + chunk] = bd, bi
    exact = torch.cat(
        [
            (queries[s : s + chunk, None, :] - reference[best_i[s : s + chunk]]).norm(dim=-1)
            for s in range(0, n, chunk)
        ]
    )
    return best_i, exact


def nearest_neighbor_distance(samples: Tensor, reference: Tensor, chunk: int = 1024) -> Tensor:
    r"""Euclidean distance of each sample to its nearest reference point: ``min_j |s_i - r_j|``.

    A memorisation check: a generative model that copies its training set produces samples at
    (near) zero distance from ``reference`` = training data; compare against the same statistic for
    held-out data. Computed in ``chunk x chunk`` blocks, so it scales to large sets.

    Arguments:
        samples: points, shape ``(n, ...)`` (one point is enough).
        reference: points, shape ``(m, ...)``, same flattened dimension.
        chunk: block size along both sets (memory ``~ chunk^2`` entries).

    Returns:
        Distances, shape ``(n,)``, on the device and in the dtype of ``samples``.
    """
    s = _points(samples, "samples", min_points=1)
    r = _points(reference, "reference", min_points=1)
    if s.shape[1] != r.shape[1]:
        fail(
            "reference",
            f"must have the same number of features as samples ({s.shape[1]})",
            r.shape[1],
        )
    if s.device != r.device:
        fail("reference", f"must be on the same device as samples ({s.device})", str(r.device))
    _check_int(chunk, "chunk", 1)
    _, dist = knn(s, r.to(s.dtype), k=1, chunk=chunk, exclude_self=False)
    return dist[:, 0]


def _log_unit_ball_volume(d: int) -> float:
    """``log V_d``, ``V_d = pi^{d/2} / Gamma(d/2 + 1)`` the volume of the unit ball in ``R^d``."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def knn_entropy(x: Tensor, k: int = 5) -> float:
    r"""Kozachenko–Leonenko k-nearest-neighbour estimate of the differential entropy ``H(p)``.

    .. math::
        \hat H = \psi(n) - \psi(k) + \log V_d + \frac{d}{n}\sum_{i=1}^n \log \varepsilon_i,

    where ``eps_i`` is the distance of ``x_i`` to its ``k``-th nearest neighbour among the other
    points, ``psi`` the digamma function and ``V_d`` the unit-ball volume. Consistent and nearly
    unbiased in low dimension (``d`` up to ~5 with a few thousand points); strongly biased in high
    dimension.

    Arguments:
        x: samples, shape ``(n, ...)``, flattened to ``(n, d)``; no point may have k exact copies.
        k: neighbour order, ``1 <= k < n``.

    Returns:
        The entropy estimate in nats.

    References:
        Kozachenko & Leonenko, Problems Inform. Transmission 23, 1987;
        Kraskov, Stögbauer & Grassberger, Phys. Rev. E 69, 2004, eq. (20).
    """
    x = _points(x, "x")
    n, d = x.shape
    _check_int(k, "k", 1)
    if k >= n:
        fail("k", f"must be smaller than the number of points ({n})", k)
    _, dist = knn(x.double(), x.double(), k=k, chunk=1024, exclude_self=True)
    eps = dist[:, k - 1]
    if bool((eps <= 0).any()):
        fail(
            "x",
            f"must not contain points with {k} or more exact duplicates (k-NN distance 0)",
            f"{int((eps <= 0).sum())} such points",
        )
    return float(digamma(n) - digamma(k) + _log_unit_ball_volume(d) + d * eps.log().mean())


def kl_to_standard_normal(x: Tensor, k: int = 5) -> float:
    r"""Nonparametric estimate of ``KL(p || N(0, I))`` from samples of ``p`` (low dimension only).

    .. math::
        \mathrm{KL}(p \| N(0, I)) = -H(p) + \mathbb E_p\big[|x|^2 / 2\big] + \tfrac d2 \log 2\pi,

    with ``H(p)`` from :func:`knn_entropy` and the expectation as a sample mean. Zero (up to
    estimator noise, can be slightly negative) for standard normal samples; ``|m|^2 / 2`` for
    ``N(m, I)``.

    Arguments:
        x: samples, shape ``(n, ...)``, flattened to ``(n, d)``.
        k: neighbour order of the entropy estimator.

    Returns:
        The KL estimate in nats.
    """
    xf = _points(x, "x")
    h = knn_entropy(xf, k=k)
    d = xf.shape[1]
    energy = float(0.5 * (xf.double() ** 2).sum(1).mean())
    return -h + energy + 0.5 * d * math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# precision, recall, density and coverage (k-NN manifolds)
# ----------------------------------------------------------------------------------------------

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
    rows = max(1, min(chunk, _chunk_rows(n)))
    piece = max(1, _BLOCK_ENTRIES // max(1, real.shape[1]))
    for s in range(0, fake.shape[0], rows):
        f, fr2 = fake[s : s + rows], fake_r2[s : s + rows, None]
        d2 = _sq_dists(f, real)  # (r, n)
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
        \mathrm{precision} = rac1m \sum_j 1ig[\exists i: |Y_j - X_i| < \mathrm{NND}_k(X_i)ig],
        \qquad
        \mathrm{recall} = rac1n \sum_i 1ig[\exists j: |X_i - Y_j| < \mathrm{NND}_k(Y_j)ig],

        \mathrm{density} = rac1{km} \sum_j \sum_i 1ig[|Y_j - X_i| < \mathrm{NND}_k(X_i)ig],
        \qquad
        \mathrm{coverage} = rac1n \sum_i 1ig[\min_j |X_i - Y_j| < \mathrm{NND}_k(X_i)ig].

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
    x, y = _pair(real, fake, names=("real", "fake"))
    _check_int(k, "k", 1)
    _check_int(max_points, "max_points", 2)
    _check_int(seed, "seed", 0)
    _check_int(chunk, "chunk", 1)
    g = torch.Generator().manual_seed(seed)
    x = _subsample(x, max_points, g).double()
    y = _subsample(y, max_points, g).double()
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


# ----------------------------------------------------------------------------------------------
# likelihood units
# ----------------------------------------------------------------------------------------------


def bits_per_dim(nll_nats: float | Tensor, dim: int) -> float:
    r"""Convert a negative log-likelihood in nats per sample to bits/dim: ``nll / (d ln 2)``.

    Arguments:
        nll_nats: NLL in nats per sample — a number, or a tensor of per-sample NLLs (averaged).
            Any dequantisation / rescaling of discrete data must already be accounted for.
        dim: data dimension ``d`` (e.g. ``C * H * W``).

    Returns:
        Bits per dimension.
    """
    _check_int(dim, "dim", 1)
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
