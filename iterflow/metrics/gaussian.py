"""Gaussian fits of samples: the Fréchet distance (the formula behind FID) and the KL to N(0, I).

References:
    Dowson & Landau, "The Fréchet distance between multivariate normal distributions", 1982.
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule ...", arXiv:1706.08500 (FID).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
from torch import Tensor

from iterflow.errors import fail
from iterflow.metrics.clouds import point_cloud, point_pair

__all__ = ["frechet_distance", "gaussian_kl_to_standard"]


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
    x, y = point_pair(feat_x, feat_y, names=("feat_x", "feat_y"))
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
    :func:`~iterflow.metrics.neighbors.kl_to_standard_normal` in low dimension for that).

    Arguments:
        x: samples, shape ``(n, ...)``, flattened to ``(n, d)``.

    Returns:
        The KL in nats; ``inf`` if ``C`` is singular (for instance ``n <= d``).
    """
    x = point_cloud(x, "x")
    m, c = _mean_cov(x)
    sign, logdet = np.linalg.slogdet(c)
    if sign <= 0:
        return math.inf
    return float(0.5 * (np.trace(c) + m @ m - c.shape[0] - logdet))
