"""Solvers against exact solutions (with measured convergence orders) and divergence estimators
against the autograd Jacobian."""

from __future__ import annotations

import math

import pytest
import torch

from iterflow.core.ode import (
    BATCHED_MIN_PRODUCTS,
    FIXED_SOLVERS,
    SolverSpec,
    divergence_exact,
    divergence_hutchinson,
    integrate,
    jacobian_terms,
    make_probes,
    solver_names,
    use_batched_backward,
)
from iterflow.errors import InputError


def rotation_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy/dt = (1 + t) J y with J the rotation generator: y(t) = R(t + t^2/2) y0 (time-dependent)."""
    return (1 + t) * torch.stack([-y[:, 1], y[:, 0]], dim=1)


def exact_rotation(y0: torch.Tensor, t: float) -> torch.Tensor:
    a = t + t * t / 2
    c, s = math.cos(a), math.sin(a)
    return torch.stack([c * y0[:, 0] - s * y0[:, 1], s * y0[:, 0] + c * y0[:, 1]], dim=1)


@pytest.mark.parametrize("name", FIXED_SOLVERS.names())
def test_fixed_solver_order(name: str) -> None:
    y0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=torch.float64)
    exact = exact_rotation(y0, 1.0)
    errs = []
    for steps in (16, 32, 64):
        y1 = integrate(rotation_field, y0, 0.0, 1.0, SolverSpec(name, steps))
        errs.append(float((y1 - exact).abs().max()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    expected = FIXED_SOLVERS[name].order
    assert abs(orders[-1] - expected) < 0.25, (name, orders, errs)


@pytest.mark.parametrize("name", ["dopri5", "bosh3"])
def test_adaptive_solver_meets_tolerance(name: str) -> None:
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    y1 = integrate(rotation_field, y0, 0.0, 1.0, SolverSpec(name, atol=1e-9, rtol=1e-9))
    assert torch.allclose(y1, exact_rotation(y0, 1.0), atol=1e-7)


@pytest.mark.parametrize("name", ["rk4", "dopri5"])
def test_backward_integration_inverts(name: str) -> None:
    y0 = torch.tensor([[0.2, -1.0]], dtype=torch.float64)
    spec = SolverSpec(name, 64, 1e-10, 1e-10)
    y1 = integrate(rotation_field, y0, 0.0, 1.0, spec)
    back = integrate(rotation_field, y1, 1.0, 0.0, spec)
    assert torch.allclose(back, y0, atol=1e-8)


def test_tuple_state_and_saved_grid() -> None:
    # d/dt (y, l) = (-y, 1): y = y0 e^{-t}, l = t
    def f(
        t: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return -s[0], torch.ones_like(s[1])

    y0 = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    for name in ("rk4", "dopri5"):
        states = integrate(f, y0, 0.0, 2.0, SolverSpec(name, 8, 1e-9, 1e-9), save_every_step=True)
        assert len(states) == 9
        y, ell = states[-1]
        assert torch.allclose(y, torch.full_like(y, math.exp(-2)), atol=1e-5)
        assert torch.allclose(ell, torch.full_like(ell, 2.0), atol=1e-9)


@pytest.mark.parametrize("dim", [1, 3, 8])
def test_row_error_norm_holds_every_row_to_the_tolerance(dim: int) -> None:
    # dy/dt = -k_i (1 + cos(6 t)) y row by row, one fast row among many slow ones; with the
    # divergence-like accumulator d(l)/dt = -dim * rate: y = y0 exp(-k_i g(t)), l = -dim k_i g(t)
    # with g(t) = t + sin(6 t) / 6.
    gen = torch.Generator().manual_seed(dim)
    rows = 8000
    k = torch.full((rows,), 0.5, dtype=torch.float64)
    k[int(torch.randint(rows, (1,), generator=gen))] = 10.0
    y0 = torch.randn(rows, dim, generator=gen, dtype=torch.float64)

    def f(t: torch.Tensor, s: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        rate = k * (1 + torch.cos(6 * t))
        return -rate[:, None] * s[0], -dim * rate

    g = 1.0 + math.sin(6.0) / 6
    want_y, want_l = y0 * torch.exp(-k * g)[:, None], -dim * k * g
    tol = 1e-6
    err = {}
    for norm in ("batch", "rows"):
        spec = SolverSpec("dopri5", atol=tol, rtol=tol, error_norm=norm)
        y, ell = integrate(f, (y0, torch.zeros(rows, dtype=torch.float64)), 0.0, 1.0, spec)
        err[norm] = max(scaled_error(y, want_y, tol), scaled_error(ell, want_l, tol))
    assert err["rows"] < 20  # the fast row is held to the tolerance (local errors add up)
    assert err["batch"] > 5 * err["rows"]  # the batch RMS lets that row drift (the test can fail)
    # a lone tensor state: the same control
    spec = SolverSpec("dopri5", atol=tol, rtol=tol, error_norm="rows")
    y = integrate(lambda t, y: -(k * (1 + torch.cos(6 * t)))[:, None] * y, y0, 0.0, 1.0, spec)
    assert scaled_error(y, want_y, tol) < 20


def scaled_error(got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    """The largest error in units of the solver's tolerance ``atol + rtol |y|``."""
    return float(((got - want).abs() / (tol + tol * want.abs())).max())


def test_unknown_solver_is_rejected() -> None:
    with pytest.raises(InputError, match="solver"):
        SolverSpec("rk5")
    with pytest.raises(InputError, match="steps"):
        SolverSpec("rk4", steps=0)
    with pytest.raises(InputError, match="error_norm"):
        SolverSpec("dopri5", error_norm="max")
    assert "dopri5" in solver_names() and "euler" in solver_names()


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).double()


def test_exact_divergence_matches_jacobian_trace() -> None:
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    v = net(x)
    div = divergence_exact(v, x, create_graph=False)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(net, x[i : i + 1].detach())[0, :, 0, :]
        assert torch.allclose(div[i], torch.trace(jac), atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(kind: str) -> None:
    net = _net()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = net(x)
    exact = divergence_exact(v, x, create_graph=False)
    gen = torch.Generator().manual_seed(0)
    k = 4000
    eps = make_probes(tuple(x.shape), k, kind=kind, generator=gen, dtype=torch.float64)
    # one estimate per probe, to get the standard error of their mean
    singles = torch.stack(
        [divergence_hutchinson(v, x, eps[j : j + 1], create_graph=False) for j in range(k)]
    )
    mean, se = singles.mean(0), singles.std(0) / math.sqrt(k)
    assert bool(((mean - exact).abs() <= 5 * se + 1e-12).all()), (mean, exact, se)
    # the K-probe estimator is the average of single-probe ones
    assert torch.allclose(
        divergence_hutchinson(v, x, eps[:10], create_graph=False), singles[:10].mean(0)
    )


def test_rademacher_probes_are_signs() -> None:
    e = make_probes((100, 3), 2, generator=torch.Generator().manual_seed(1))
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(InputError, match="probe_kind"):
        make_probes((2, 2), 1, kind="uniform")


@pytest.mark.parametrize("with_probes", [False, True])
def test_batched_and_looped_jacobian_terms_agree(with_probes: bool) -> None:
    net = _net()
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    v = net(x)
    eps = None
    if with_probes:
        eps = make_probes(
            (7, 4), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64
        )
    a = jacobian_terms(v, x, eps, create_graph=True, batched=True)
    b = jacobian_terms(v, x, eps, create_graph=True, batched=False)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-12)
    # differentiable (CNF training): gradients of both agree
    params = list(net.parameters())[:-1]  # the output bias does not enter the Jacobian
    ga = torch.autograd.grad((a[0] + a[1]).sum(), params, retain_graph=True)
    gb = torch.autograd.grad((b[0] + b[1]).sum(), params)
    for p, q in zip(ga, gb):
        assert torch.allclose(p, q, atol=1e-12)


def test_jacobian_terms_match_the_autograd_jacobian() -> None:
    net = _net()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    div, frob = jacobian_terms(net(x), x, create_graph=False)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(net, x[i : i + 1].detach())[0, :, 0, :]
        assert torch.allclose(div[i], torch.trace(jac), atol=1e-12)
        assert torch.allclose(frob[i], jac.pow(2).sum(), atol=1e-12)


def test_batched_backward_rule() -> None:
    cpu = torch.device("cpu")
    assert not use_batched_backward(1, cpu)
    assert not use_batched_backward(BATCHED_MIN_PRODUCTS - 1, cpu)
    assert use_batched_backward(BATCHED_MIN_PRODUCTS, cpu)
    assert use_batched_backward(2, torch.device("meta"))
    assert not use_batched_backward(BATCHED_MIN_PRODUCTS, cpu, event_dims=3)  # images: the loop
    assert use_batched_backward(2, torch.device("meta"), event_dims=3)
