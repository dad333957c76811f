"""The one augmented integrand (iterflow.core.integrand) against closed forms, in float64.

A linear field ``v(x) = A x + b`` run for a time ``T`` is the block velocity ``w(x) = T (A x + b)``
over ``s in [0, 1]``; with ``x(tau)`` the path of ``v``:

- end point ``x(T) = e^{TA} x + (int_0^T e^{tau A} d tau) b`` (the top-right block of
  ``exp(T [[A, b], [0, 0]])``);
- ``int_0^1 div w ds = T tr A`` and ``int_0^1 ||dw/dx||_F^2 ds = T^2 ||A||_F^2``;
- ``int_0^1 |w|^2 ds = T int_0^T |e^{tau A} (A x + b)|^2 d tau`` (Gauss-Legendre quadrature);
- pushed through blocks, ``N(0, I)`` pulls back to a Gaussian whose density is the closed form of
  :meth:`Flow.log_prob`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow
from iterflow.core.integrand import (
    EXACT_DIVERGENCE_MAX_DIM,
    PathIntegrals,
    draw_probes,
    integrate_chain,
    integrate_path,
    resolve_divergence,
)
from iterflow.core.nn import MLPVelocity
from iterflow.core.ode import SolverSpec, make_probes
from iterflow.errors import InputError

DT = torch.float64
DIMS = (1, 2, 3, 5, 10)
RK4 = SolverSpec("rk4", 48)


class LinearField(nn.Module):
    """``w(x, s) = T (A x + b)``: the field ``A x + b`` run for a time ``T`` over ``s in [0, 1]``."""

    def __init__(self, a: Tensor, b: Tensor, horizon: float) -> None:
        super().__init__()
        self.a, self.b, self.horizon = nn.Parameter(a.clone()), nn.Parameter(b.clone()), horizon

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        return self.horizon * (x @ self.a.T + self.b)


def random_field(d: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=DT) * 0.6 / math.sqrt(d)
    return a, 0.5 * torch.randn(d, generator=g, dtype=DT)


def affine_map(a: Tensor, b: Tensor, horizon: float) -> tuple[Tensor, Tensor]:
    """``(E, c)`` with ``x(T) = E x + c``: the blocks of ``exp(T [[A, b], [0, 0]])``."""
    d = a.shape[0]
    big = torch.zeros(d + 1, d + 1, dtype=DT)
    big[:d, :d], big[:d, d] = a, b
    e = torch.linalg.matrix_exp(horizon * big)
    return e[:d, :d], e[:d, d]


def exact_end(a: Tensor, b: Tensor, horizon: float, x: Tensor) -> Tensor:
    e, c = affine_map(a, b, horizon)
    return x @ e.T + c


def exact_kinetic(a: Tensor, b: Tensor, horizon: float, x: Tensor, nodes: int = 40) -> Tensor:
    """``T int_0^T |e^{tau A} (A x + b)|^2 d tau`` by Gauss-Legendre quadrature on ``[0, T]``."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    taus, weights = horizon * (u + 1) / 2, horizon * w / 2
    w0 = x @ a.T + b
    total = torch.zeros(x.shape[0], dtype=DT)
    for tau, wt in zip(taus, weights):
        total = total + float(wt) * (w0 @ torch.linalg.matrix_exp(float(tau) * a).T).pow(2).sum(1)
    return horizon * total


def points(n: int, d: int, seed: int = 0) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_linear_field_closed_forms(d: int, create_graph: bool) -> None:
    a, b = random_field(d, seed=d)
    horizon = 0.8
    x = points(16, d)
    r = integrate_path(LinearField(a, b, horizon), x, RK4, create_graph=create_graph)
    torch.testing.assert_close(r.z, exact_end(a, b, horizon, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(r.div, torch.full((16,), horizon * float(torch.trace(a)), dtype=DT))
    frob = horizon**2 * float(a.pow(2).sum())
    torch.testing.assert_close(r.jacobian, torch.full((16,), frob, dtype=DT))
    torch.testing.assert_close(r.kinetic, exact_kinetic(a, b, horizon, x), atol=1e-9, rtol=1e-9)
    assert (r.div.grad_fn is not None) == create_graph


@pytest.mark.parametrize("d", DIMS)
def test_training_gradients_of_the_integrals(d: int) -> None:
    """``d/dA (T tr A) = T I`` and ``d/dA (T^2 ||A||_F^2) = 2 T^2 A`` through the integrand (the
    per-row loop below the batched-pass threshold, the batched pass above it)."""
    a, b = random_field(d, seed=10 + d)
    horizon = 1.3
    field = LinearField(a, b, horizon)
    r = integrate_path(field, points(4, d), SolverSpec("euler", 3), create_graph=True)
    (g_div,) = torch.autograd.grad(r.div[0], field.a, retain_graph=True)
    (g_jac,) = torch.autograd.grad(r.jacobian[0], field.a)
    torch.testing.assert_close(g_div, horizon * torch.eye(d, dtype=DT))
    torch.testing.assert_close(g_jac, 2 * horizon**2 * a)


def test_integrals_not_asked_for_are_zero_and_free() -> None:
    a, b = random_field(3, seed=1)
    x = points(8, 3)
    blk = Block(LinearField(a, b, 1.0))
    full = integrate_path(blk, x, RK4, create_graph=False)
    for kwargs, asked in (
        ({"divergence": False}, ("kinetic", "jacobian")),
        ({"kinetic": False}, ("div", "jacobian")),
        ({"jacobian": False}, ("div", "kinetic")),
        ({"derivatives": False}, ("kinetic",)),
        ({"divergence": False, "kinetic": False, "jacobian": False}, ()),
    ):
        r = integrate_path(blk, x, RK4, create_graph=False, **kwargs)
        torch.testing.assert_close(r.z, full.z, atol=1e-14, rtol=0)
        for name in ("div", "kinetic", "jacobian"):
            want = getattr(full, name) if name in asked else torch.zeros(8, dtype=DT)
            torch.testing.assert_close(getattr(r, name), want, atol=1e-14, rtol=0)
    # nothing asked for: a plain integration, one velocity call per stage, no graph in evaluation
    with torch.enable_grad():
        r = integrate_path(blk, x, RK4, create_graph=False, derivatives=False, kinetic=False)
    assert r.z.grad_fn is None
    torch.testing.assert_close(r.z, blk.encode(x, RK4), atol=0, rtol=0)


def test_any_callable_is_a_velocity_and_adaptive_solvers_work() -> None:
    a, b = random_field(2, seed=3)
    x = points(5, 2)

    def velocity(y: Tensor, s: Tensor) -> Tensor:
        return y @ a.T + b

    spec = SolverSpec("dopri5", atol=1e-10, rtol=1e-10)
    r = integrate_path(velocity, x, spec, create_graph=False, jacobian=False)
    torch.testing.assert_close(r.z, exact_end(a, b, 1.0, x), atol=1e-8, rtol=0)
    torch.testing.assert_close(r.kinetic, exact_kinetic(a, b, 1.0, x), atol=1e-8, rtol=0)
    torch.testing.assert_close(r.div, torch.full((5,), float(torch.trace(a)), dtype=DT))


def test_chain_sums_the_blocks() -> None:
    (a1, b1), (a2, b2) = random_field(3, seed=4), random_field(3, seed=5)
    x = points(6, 3)
    chain = [Block(LinearField(a1, b1, 0.5)), Block(LinearField(a2, b2, 1.2))]
    r = integrate_chain(chain, x, RK4, create_graph=False)
    first = integrate_path(chain[0], x, RK4, create_graph=False)
    second = integrate_path(chain[1], first.z, RK4, create_graph=False)
    assert isinstance(r, PathIntegrals)
    torch.testing.assert_close(r.z, second.z, atol=0, rtol=0)
    for name in ("div", "kinetic", "jacobian"):
        torch.testing.assert_close(getattr(r, name), getattr(first, name) + getattr(second, name))
    torch.testing.assert_close(
        r.div,
        torch.full((6,), 0.5 * float(torch.trace(a1)) + 1.2 * float(torch.trace(a2)), dtype=DT),
    )


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("d", (2, 5))
def test_hutchinson_is_unbiased_for_divergence_and_jacobian(kind: str, d: int) -> None:
    """One probe per row on many copies of one point: the row estimates average to the exact terms
    (within five standard errors)."""
    a, b = random_field(d, seed=20 + d)
    n = 4000
    x = points(1, d).expand(n, d).clone()
    eps = make_probes((n, d), 1, kind=kind, generator=torch.Generator().manual_seed(d), dtype=DT)
    field = LinearField(a, b, 0.9)
    r = integrate_path(field, x, SolverSpec("rk4", 4), probes=eps, create_graph=False)
    exact = integrate_path(field, x[:1], SolverSpec("rk4", 4), create_graph=False)
    for name in ("div", "jacobian"):
        est, ref = getattr(r, name), float(getattr(exact, name)[0])
        se = float(est.std()) / math.sqrt(n)
        assert abs(float(est.mean()) - ref) <= 5 * se + 1e-12, (name, float(est.mean()), ref, se)
    torch.testing.assert_close(r.z, exact.z.expand(n, d))


def test_hutchinson_is_unbiased_along_a_nonlinear_path() -> None:
    """Probes held fixed along the path estimate ``int div v ds`` without bias for a nonlinear field."""
    torch.manual_seed(0)
    blk = Block(MLPVelocity(3, hidden=(16,), activation="tanh")).to(DT)
    n = 3000
    x = points(1, 3, seed=1).expand(n, 3).clone()
    spec = SolverSpec("rk4", 4)
    eps = draw_probes(x, "hutchinson", 1, "rademacher", torch.Generator().manual_seed(2))
    r = integrate_path(blk, x, spec, probes=eps, create_graph=False)
    exact = integrate_path(blk, x[:1], spec, create_graph=False)
    for name in ("div", "jacobian"):
        est, ref = getattr(r, name), float(getattr(exact, name)[0])
        se = float(est.std()) / math.sqrt(n)
        assert se > 0 and abs(float(est.mean()) - ref) <= 5 * se, (name, est.mean(), ref, se)


def gaussian_flow(d: int) -> tuple[Flow, Tensor, Tensor]:
    """Two linear blocks and a normalisation; returns the flow and ``(M, c)`` with ``z = M u + c``."""
    (a1, b1), (a2, b2) = random_field(d, seed=30 + d), random_field(d, seed=40 + d)
    blocks = [Block(LinearField(a1, b1, 1.0)), Block(LinearField(a2, b2, 0.7))]
    g = torch.Generator().manual_seed(d)
    shift, scale = torch.randn(d, generator=g, dtype=DT), torch.rand(d, generator=g, dtype=DT) + 0.5
    flow = Flow(blocks, (d,), shift=shift, scale=scale).to(DT)
    e1, c1 = affine_map(a1, b1, 1.0)
    e2, c2 = affine_map(a2, b2, 0.7)
    m, c = e2 @ e1, e2 @ c1 + c2  # z = e2 (e1 u + c1) + c2
    return flow, m, c


@pytest.mark.parametrize("d", DIMS)
def test_log_prob_of_a_gaussian_to_gaussian_linear_flow(d: int) -> None:
    """``x = shift + scale * M^{-1} (z - c)`` with ``z ~ N(0, I)`` is Gaussian; its log-density (by
    :class:`torch.distributions.MultivariateNormal`) is what :meth:`Flow.log_prob` must return."""
    flow, m, c = gaussian_flow(d)
    minv = torch.linalg.inv(m)
    lin = torch.diag(flow.scale) @ minv  # x = shift + lin (z - c)
    law = torch.distributions.MultivariateNormal(flow.shift - lin @ c, lin @ lin.T)
    x = law.sample((40,))
    with torch.no_grad():
        lp = flow.log_prob(x, solver="rk4", steps=48)
    torch.testing.assert_close(lp, law.log_prob(x), atol=1e-8, rtol=0)
    lp_grad = flow.log_prob(x, solver="rk4", steps=48)  # training path: differentiable, same values
    torch.testing.assert_close(lp_grad.detach(), lp, atol=1e-12, rtol=0)
    assert lp_grad.grad_fn is not None


def test_one_auto_rule() -> None:
    assert resolve_divergence("auto", EXACT_DIVERGENCE_MAX_DIM) == "exact"
    assert resolve_divergence("auto", EXACT_DIVERGENCE_MAX_DIM + 1) == "hutchinson"
    assert resolve_divergence("exact", 10_000) == "exact"
    assert (
        draw_probes(torch.zeros(3, EXACT_DIVERGENCE_MAX_DIM), "auto", 2, "rademacher", None) is None
    )
    eps = draw_probes(torch.zeros(3, EXACT_DIVERGENCE_MAX_DIM + 1), "auto", 2, "gaussian", None)
    assert eps is not None and eps.shape == (2, 3, EXACT_DIVERGENCE_MAX_DIM + 1)
    with pytest.raises(InputError, match="divergence"):
        resolve_divergence("trace", 2)
    with pytest.raises(InputError, match="probe_kind"):
        draw_probes(torch.zeros(3, 40), "auto", 2, "uniform", None)
