"""Gaussian mixtures with exact log densities: the 8-Gaussians benchmark and user mixtures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from iterflow.data.base import GeneratedDataset, sample_categorical
from iterflow.errors import check_finite, fail


def _as_float64(value: Any, argument: str) -> torch.Tensor:
    """Convert a tensor / array / list / number to a float64 CPU tensor, failing with InputError."""
    try:
        if isinstance(value, torch.Tensor):
            out = value.detach().to(device="cpu", dtype=torch.float64)
        else:
            out = torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as err:
        fail(argument, "must be numeric (a tensor, array or nested list of numbers)", str(err))
    check_finite(out, argument)
    return out


def _check_means(means: Any) -> torch.Tensor:
    mu = _as_float64(means, "means")
    if mu.dim() != 2 or mu.shape[0] < 1 or mu.shape[1] < 1:
        fail("means", "must be a 2-D array (K, d) with K >= 1 and d >= 1", tuple(mu.shape))
    return mu


def _covs_from_stds(stds: Any, k: int, d: int) -> torch.Tensor:
    """Diagonal covariances ``(K, d, d)`` from a scalar, ``(K,)`` or ``(K, d)`` array of stds."""
    s = _as_float64(stds, "stds")
    if s.dim() == 0:
        s = s.expand(k, d)
    elif s.dim() == 1 and s.shape[0] == k:
        s = s[:, None].expand(k, d)
    elif tuple(s.shape) != (k, d):
        fail("stds", f"must be a number or have shape ({k},) or ({k}, {d})", tuple(s.shape))
    if bool((s <= 0).any()):
        fail("stds", "must be > 0", float(s.min()))
    return torch.diag_embed(s**2)


def _covariances(covs: Any, stds: Any, k: int, d: int) -> torch.Tensor:
    """``(K, d, d)`` covariances from exactly one of ``covs`` and ``stds``.

    A ``covs`` value with fewer than 3 dimensions is read as standard deviations.
    """
    if (covs is None) == (stds is None):
        fail("covs", "give exactly one of covs and stds", "both" if covs is not None else "neither")
    if covs is None:
        return _covs_from_stds(stds, k, d)
    if np.ndim(covs) < 3:
        return _covs_from_stds(covs, k, d)
    return _check_covs(covs, k, d)


def _check_covs(covs: Any, k: int, d: int) -> torch.Tensor:
    c = _as_float64(covs, "covs")
    if tuple(c.shape) != (k, d, d):
        fail("covs", f"must have shape ({k}, {d}, {d}) to match means", tuple(c.shape))
    if not torch.allclose(c, c.transpose(-1, -2), rtol=1e-8, atol=1e-12):
        fail("covs", "must be symmetric", "an asymmetric matrix")
    return c


def _check_weights(weights: Any, k: int) -> torch.Tensor:
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = _as_float64(weights, "weights")
    if tuple(w.shape) != (k,):
        fail("weights", f"must have shape ({k},) to match means", tuple(w.shape))
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        fail("weights", "must be >= 0 with a positive sum", w.tolist())
    return w / w.sum()


def _cholesky(covs: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(covs)
    if bool((info != 0).any()):
        bad = int((info != 0).nonzero()[0])
        fail("covs", "must be positive definite", f"component {bad} is not")
    return chol


class GaussianMixture(GeneratedDataset):
    """Mixture of Gaussians :math:`p(x) = \\sum_k w_k\\, \\mathcal N(x; \\mu_k, \\Sigma_k)`.

    The log density is exact,
    :math:`\\log p(x) = \\operatorname{logsumexp}_k [\\log w_k
    - \\tfrac12 \\lVert L_k^{-1}(x - \\mu_k)\\rVert^2 - \\log\\lvert L_k\\rvert
    - \\tfrac d2 \\log 2\\pi]` with :math:`\\Sigma_k = L_k L_k^\\top`; the entropy (no closed
    form) is estimated by Monte Carlo.

    Args:
        means: ``(K, d)`` component means.
        covs: ``(K, d, d)`` covariance matrices (symmetric positive definite), or standard
            deviations: a number, ``(K,)`` or ``(K, d)`` (diagonal covariances :math:`s^2`).
        weights: ``(K,)`` non-negative weights (normalised here); default uniform.
        stds: standard deviations as a keyword, instead of ``covs``.
        name: data set name.

    Example:
        >>> import torch
        >>> gm = GaussianMixture([[0.0, 0.0]], stds=1.0)
        >>> float(gm.log_prob(torch.zeros(1, 2)))  # -log(2 pi)
        -1.8378770351409912
    """

    has_log_prob = True

    def __init__(
        self,
        means: Any,
        covs: Any = None,
        weights: Any = None,
        *,
        stds: Any = None,
        name: str = "gaussian-mixture",
    ) -> None:
        self.means = _check_means(means)
        k, d = self.means.shape
        self.covs = _covariances(covs, stds, k, d)  # (K, d, d)
        self.chol = _cholesky(self.covs)
        self.weights = _check_weights(weights, k)
        self.name, self.dim = name, int(d)

    @property
    def n_components(self) -> int:
        """Number of components :math:`K`."""
        return int(self.means.shape[0])

    @property
    def num_classes(self) -> int:
        """One class per component: ``label_splits`` gives each point's component."""
        return self.n_components

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.draw_labelled(n, generator)[0]

    def draw_labelled(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and the component ``k`` each was drawn from (its class)."""
        idx = sample_categorical(self.weights, n, generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)  # (n, d)
        return self.means[idx] + (self.chol[idx] @ z[:, :, None])[:, :, 0], idx

    def class_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; mu_k, Sigma_k)`` of every row and component, ``(n, K)`` (float64): the
        exact class-conditional densities ``log p(x | y = k)``."""
        x64 = x.to(torch.float64)
        mu, chol = self.means.to(x.device), self.chol.to(x.device)
        diff = (x64[None, :, :] - mu[:, None, :]).transpose(1, 2)  # (K, d, n)
        white = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, d, n)
        maha = (white**2).sum(dim=1)  # (K, n)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (K,)
        const = -half_logdet - 0.5 * self.dim * math.log(2 * math.pi)
        return (const[:, None] - 0.5 * maha).T

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        log_w = torch.log(self.weights.to(x.device))
        return torch.logsumexp(self.class_log_prob(x) + log_w, dim=1)  # (n,)

    def _exact_entropy(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Generator summary plus the number of components."""
        return {**super().describe(), "n_components": self.n_components}


def eight_gaussians() -> GaussianMixture:
    """FFJORD's ``8gaussians``: centres :math:`4 u_k/\\sqrt2`, std :math:`0.5/\\sqrt2`.

    The centres are at multiples of 45 degrees on the circle of radius 4 (FFJORD's order), and all
    points are divided by :math:`\\sqrt2`, as in FFJORD's ``toy_data.inf_train_gen``
    (Grathwohl et al., 2019, arXiv:1810.01367).
    """
    r = 1.0 / math.sqrt(2.0)
    unit = [(1, 0), (-1, 0), (0, 1), (0, -1), (r, r), (r, -r), (-r, r), (-r, -r)]
    means = torch.tensor(unit, dtype=torch.float64) * 4.0 / math.sqrt(2.0)
    return GaussianMixture(means, stds=0.5 / math.sqrt(2.0), name="8gaussians")


def gmm_2d() -> GaussianMixture:
    """A small anisotropic 2-D mixture: three correlated components of unequal weight."""
    means = [[-2.0, -1.5], [2.0, -1.0], [0.0, 2.0]]
    covs = [
        [[0.6, 0.35], [0.35, 0.4]],
        [[0.3, -0.2], [-0.2, 0.5]],
        [[1.0, 0.0], [0.0, 0.15]],
    ]
    return GaussianMixture(means, covs, weights=[0.3, 0.3, 0.4], name="gmm-2d")
