r"""Closed forms on Gaussians for the harness (:mod:`closed_form_cases`): random problems (Gaussians,
transport pairs, worst-case risks), the JKO step
of ``KL(. || N(0, I))``, the Ornstein-Uhlenbeck step of local flow matching and its flow-matching
velocity, and the finite-data rectified-flow velocity in the papers' convention.

Closed forms that the package already holds are imported, not repeated: the Bures-Wasserstein
distance and the optimal map (:mod:`iterflow.apps.ot.gaussian`), the exact OU transition
(:func:`iterflow.methods.local_fm.ou_step`), the worst-case maps (``optimal_map`` of
:mod:`iterflow.apps.dro.risks`) and the finite-data velocity (:mod:`iterflow.core.rectified`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from iterflow.apps.dro import LinearRisk, QuadraticRisk
from iterflow.apps.ot import gaussian_w2_sq

DT = torch.float64


@dataclass(frozen=True)
class Gaussian:
    """``N(mean, cov)`` in float64; ``mean`` ``(d,)``, ``cov`` ``(d, d)`` symmetric positive definite."""

    mean: Tensor
    cov: Tensor

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def chol(self) -> Tensor:
        return torch.linalg.cholesky(self.cov)

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        """``n`` independent draws ``(n, d)``."""
        return self.mean + torch.randn(n, self.dim, generator=g, dtype=DT) @ self.chol().T

    def exact_sample(self, n: int, g: torch.Generator) -> Tensor:
        """``n`` points whose mean and (``1/n``) covariance are exactly ``mean`` and ``cov``."""
        z = torch.randn(n, self.dim, generator=g, dtype=DT)
        z = z - z.mean(0)
        white = torch.linalg.cholesky(z.T @ z / n)
        z = torch.linalg.solve_triangular(white, z.T, upper=False).T
        return self.mean + z @ self.chol().T

    def log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mean, cov)`` ``(n,)``."""
        dist = torch.distributions.MultivariateNormal(self.mean, covariance_matrix=self.cov)
        return dist.log_prob(x.double())


def moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and ``1/n`` covariance of ``x`` ``(n, d)`` in float64."""
    x = x.double()
    mu = x.mean(0)
    c = x - mu
    return mu, c.T @ c / x.shape[0]


def random_orthogonal(d: int, g: torch.Generator) -> Tensor:
    """A Haar-random orthogonal ``(d, d)`` matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    return q * torch.sign(torch.diagonal(r))


def random_gaussian(
    d: int, g: torch.Generator, std_range: tuple[float, float] = (0.5, 2.0)
) -> Gaussian:
    """Mean: a random direction times ``sqrt(d) U(0.5, 1.5)``; covariance ``U diag(s^2) U^T`` with
    ``U`` Haar-random and the standard deviations ``s`` log-uniform in ``std_range``."""
    u = random_orthogonal(d, g)
    lo, hi = math.log(std_range[0]), math.log(std_range[1])
    std = torch.exp(torch.empty(d, dtype=DT).uniform_(lo, hi, generator=g))
    direction = torch.randn(d, generator=g, dtype=DT)
    norm = math.sqrt(d) * float(torch.empty(1, dtype=DT).uniform_(0.5, 1.5, generator=g))
    mean = direction / direction.norm() * norm
    cov = (u * std**2) @ u.T
    return Gaussian(mean, (cov + cov.T) / 2)


def generator(*key: int) -> torch.Generator:
    """A generator seeded by the integers ``key`` (one independent stream per case, dimension, seed)."""
    return torch.Generator().manual_seed(hash(key) % (2**62))


def draw_gamma(g: torch.Generator) -> float:
    """A step size log-uniform in ``[0.5, 2]``."""
    return float(
        torch.exp(torch.empty(1, dtype=DT).uniform_(math.log(0.5), math.log(2.0), generator=g))
    )


def ot_pair(d: int, seed: int) -> tuple[Gaussian, Gaussian]:
    """``P`` and ``Q`` for transport and ratios: two random Gaussians (:func:`random_gaussian`), ``Q``'s
    mean ``P``'s moved by 2 in a random direction."""
    g = generator(8, d, seed)
    p, q = random_gaussian(d, g), random_gaussian(d, g)
    direction = random_orthogonal(d, g)[0]
    return p, Gaussian(p.mean + 2.0 * direction, q.cov)


def worst_case_problem(d: int, seed: int) -> tuple[Gaussian, QuadraticRisk, LinearRisk]:
    """Reference ``N(m, S)``, a concave quadratic risk (``Q``'s eigenvalues log-uniform in
    ``[0.25, 4]``, random eigenvectors, ``b ~ N(0, I)``) and a linear risk (``a ~ N(0, I / d)``)."""
    g = generator(10, d, seed)
    p = random_gaussian(d, g)
    u = random_orthogonal(d, g)
    eig = torch.exp(torch.empty(d, dtype=DT).uniform_(math.log(0.25), math.log(4.0), generator=g))
    q = (u * eig) @ u.T
    b = torch.randn(d, generator=g, dtype=DT)
    a = torch.randn(d, generator=g, dtype=DT) / math.sqrt(d)
    return p, QuadraticRisk((q + q.T) / 2, b), LinearRisk(a)


# ------------------------------------------------------------------------------------------------
# JKO step of KL(. || N(0, I))
# ------------------------------------------------------------------------------------------------


def kl_to_standard(mean: Tensor, cov: Tensor) -> float:
    """``KL(N(mean, cov) || N(0, I)) = (tr cov + |mean|^2 - d - log det cov) / 2``."""
    d = mean.shape[0]
    logdet = torch.linalg.slogdet(cov)[1]
    return float(0.5 * (torch.trace(cov) + mean @ mean - d - logdet))


def jko_gaussian_objective(p: Gaussian, mean: Tensor, cov: Tensor, gamma: float) -> float:
    """``KL(N(mean, cov) || N(0, I)) + W2^2(p, N(mean, cov)) / (2 gamma)`` (Bures distance)."""
    return kl_to_standard(mean, cov) + gaussian_w2_sq(p.mean, p.cov, mean, cov) / (2 * gamma)


def jko_gaussian_step(p: Gaussian, gamma: float) -> Gaussian:
    r"""The JKO step ``argmin_rho KL(rho || N(0, I)) + W2^2(p, rho) / (2 gamma)`` from ``p = N(m, S)``.

    Result: ``N(m / (1 + gamma), U diag(sigma_i^2) U^T)`` with ``S = U diag(s_i^2) U^T`` and
    ``sigma_i = (s_i + sqrt(s_i^2 + 4 gamma (1 + gamma))) / (2 (1 + gamma))``.

    Derivation. Between Gaussians the optimal maps are affine, ``T(x) = mu + A (x - m)`` with ``A``
    symmetric positive definite, and ``rho = T# p = N(mu, A S A)``. On such ``rho`` the objective is

    .. math::
        J(\mu, A) = \tfrac12 [\operatorname{tr}(ASA) + |\mu|^2 - d - \log\det(ASA)]
        + \tfrac{1}{2\gamma} [|\mu - m|^2 + \operatorname{tr}((A - I) S (A - I))].

    ``dJ/dmu = mu + (mu - m) / gamma = 0`` gives ``mu = m / (1 + gamma)``. The symmetric gradient in
    ``A``, ``(SA + AS)/2 - A^{-1} + ((A - I) S + S (A - I)) / (2 gamma) = 0``, is solved by an ``A``
    commuting with ``S``: ``(1 + gamma) S A^2 - S A - gamma I = 0``, in ``S``'s eigenbasis
    ``(1 + gamma) s^2 a^2 - s^2 a - gamma = 0``, whose positive root gives ``sigma = a s`` above.
    ``J`` is strictly convex in ``(mu, A)``, so this is the minimiser over Gaussians; it is the
    minimiser over all distributions because it satisfies the JKO step's optimality condition
    ``(T(x) - x) / gamma = -grad log(rho / q)(T(x))`` (here ``grad log(rho/q)(y) = y - Sigma^{-1}
    (y - mu)``: the constant and linear parts of both sides agree by the two equations above), and
    the objective (1-convex KL plus a ``1/gamma``-convex W2 term along generalised geodesics) has a
    unique minimiser. Checked numerically by direct minimisation over ``N(mu, L L^T)`` in
    :func:`closed_form_cases.case_jko`; for ``S = s^2 I`` it is the isotropic formula of
    ``tests/test_jko.py``.
    """
    w, u = torch.linalg.eigh(p.cov)
    s = w.clamp_min(0).sqrt()
    sigma = (s + torch.sqrt(s * s + 4 * gamma * (1 + gamma))) / (2 * (1 + gamma))
    cov = (u * sigma**2) @ u.T
    return Gaussian(p.mean / (1 + gamma), (cov + cov.T) / 2)


class LinearVelocity(nn.Module):
    """``v(x, s) = B x + c`` with ``B`` symmetric (float64, starts at zero): its flow over ``[0, 1]`` is
    ``x -> e^B x + B^{-1} (e^B - I) c``, which reaches every affine map with a symmetric positive
    definite linear part, hence the JKO step between Gaussians."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(d, d, dtype=DT))
        self.c = nn.Parameter(torch.zeros(d, dtype=DT))

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        return x @ ((self.p + self.p.T) / 2) + self.c


class StraightAffineVelocity(nn.Module):
    """The displacement interpolation of ``T(x) = A x + c`` with ``A = I + (P + P^T) / 2`` trainable
    (float64, starts at the identity): ``x_s = x_0 + s ((A - I) x_0 + c)``, velocity ``(A - I) x_0 + c``
    with ``x_0 = (I + s (A - I))^{-1} (x - s c)`` (one block of
    :class:`iterflow.apps.ot.GaussianOTVelocity`, with ``A`` and ``c`` parameters). Its paths are
    straight at constant speed, so JKO-flow's straightness term vanishes on it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(d, d, dtype=DT))
        self.c = nn.Parameter(torch.zeros(d, dtype=DT))

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        am = (self.p + self.p.T) / 2
        st = torch.as_tensor(s, dtype=x.dtype)
        m = torch.eye(am.shape[0], dtype=x.dtype) + st * am
        x0 = torch.linalg.solve(m, (x - st * self.c).T).T
        return x0 @ am.T + self.c


# ------------------------------------------------------------------------------------------------
# Local flow matching: the OU step and its flow-matching velocity
# ------------------------------------------------------------------------------------------------


def ou_gaussian_step(p: Gaussian, h: float) -> Gaussian:
    """One OU step of length ``h`` from ``N(m, S)``: ``N(e^-h m, e^-2h S + (1 - e^-2h) I)`` (the law of
    :func:`iterflow.methods.local_fm.ou_step` applied to ``x ~ p``)."""
    a2 = math.exp(-2 * h)
    eye = torch.eye(p.dim, dtype=DT)
    return Gaussian(math.exp(-h) * p.mean, a2 * p.cov + (1 - a2) * eye)


class OUBridgeVelocity(nn.Module):
    r"""The minimiser of local flow matching's loss for one block from ``x_l ~ N(m, S)`` (straight path).

    With ``x_r = a x_l + b g`` (``a = e^{-h}``, ``b = sqrt(1 - a^2)``, ``g ~ N(0, I)``) and
    ``x_s = (1 - s) x_l + s x_r = c_s x_l + s b g`` (``c_s = 1 - s + s a``), the pair
    ``(x_s, dx_s/ds = (a - 1) x_l + b g)`` is jointly Gaussian, so the regression target is linear:

    .. math::
        v^*(x, s) = (a - 1) m + K_s C_s^{-1} (x - c_s m), \quad
        C_s = c_s^2 S + s^2 b^2 I, \quad K_s = (a - 1) c_s S + s b^2 I = \tfrac12 \dot C_s.

    All ``C_s`` commute (functions of ``S``), so the flow of ``v*`` is ``x -> c_s m + C_s^{1/2}
    C_0^{-1/2} (x - m)``: it carries ``N(m, S)`` to the OU step :func:`ou_gaussian_step` exactly.
    """

    def __init__(self, p: Gaussian, h: float) -> None:
        super().__init__()
        self.a = math.exp(-h)
        self.b2 = 1.0 - self.a**2
        lam, self.u = torch.linalg.eigh(p.cov)
        self.lam, self.m = lam, p.mean

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        st = torch.as_tensor(s, dtype=DT).reshape(-1, 1)  # (B|1, 1)
        c = 1 - st + st * self.a
        cov = c * c * self.lam + st * st * self.b2  # (B|1, d) eigenvalues of C_s
        k = (self.a - 1) * c * self.lam + st * self.b2  # eigenvalues of K_s
        y = (x.double() - c * self.m) @ self.u  # eigen-coordinates
        return ((self.a - 1) * self.m + (y * k / cov) @ self.u.T).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# The finite-data rectified-flow velocity, in the papers' convention
# ------------------------------------------------------------------------------------------------


def finite_data_velocity(points: Tensor, x: Tensor, s: Tensor) -> Tensor:
    """The flow-matching velocity of the data set ``points`` ``(N, d)`` written as in the papers
    (noise at ``t = 0``, data at ``t = 1``, ``t = 1 - s``; METHODS.md section 2):
    ``v(x, t) = sum_i w_i (x_i - x) / (1 - t)``, ``w_i ∝ N((x - t x_i) / (1 - t); 0, I)``, returned as
    ``dx/ds = -v`` for ``x`` ``(B, d)`` at times ``s`` ``(B,)``."""
    t = (1 - s.double())[:, None]  # (B, 1)
    diff = (x.double()[:, None, :] - t[:, :, None] * points.double()[None]) / (1 - t)[:, :, None]
    w = torch.softmax(-0.5 * diff.pow(2).sum(-1), dim=1)  # (B, N)
    return -(w @ points.double() - x.double()) / (1 - t)
