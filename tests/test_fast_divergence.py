"""The one-pass velocity and Jacobian terms of MLPVelocity (iterflow.core.nn.mlp_jacobian) against
autograd, in float64.

The reference is the full Jacobian ``J = dv/dx`` of every row (``torch.func``): ``tr J``,
``||J||_F^2``, ``eps^T J eps`` and ``|J eps|^2``; then the integrand, ``Flow.log_prob`` and the
CNF / JKO-flow losses and their parameter gradients through the one-pass path against the autograd
path (:func:`iterflow.core.integrand.autograd_jacobian_terms`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

import iterflow.core.nn.mlp_jacobian as mlp_jacobian
from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Block, Flow
from iterflow.core.guidance import guidance
from iterflow.core.integrand import (
    Reversed,
    autograd_jacobian_terms,
    fused_terms,
    integrate_chain,
    integrate_path,
)
from iterflow.core.nn import MLPVelocity
from iterflow.core.ode import SolverSpec, make_probes
from iterflow.methods.cnf import likelihood_loss
from iterflow.methods.jko import jko_loss

DT = torch.float64
TOL = 1e-10
# (dim, hidden, activation, time_freqs, num_classes, x_freqs): widths, depths, activations, time
# features, class conditioning and Fourier features of x varied together
NETS = [
    (1, (7,), "silu", 0, 0, 0),
    (2, (16, 16, 16), "silu", 4, 0, 8),
    (2, (9, 5), "gelu", 0, 3, 4),
    (3, (8, 11), "tanh", 2, 0, 5),
    (5, (12, 12, 12), "softplus", 0, 2, 0),
    (10, (16, 8), "relu", 1, 0, 6),
    (32, (24, 24), "gelu", 3, 4, 0),
]
IDS = "d{0}-{2}-tf{3}-c{4}-xf{5}".format


def make_net(
    dim: int, hidden: tuple[int, ...], act: str, freqs: int, classes: int, x_freqs: int = 0
) -> MLPVelocity:
    torch.manual_seed(dim * 100 + len(hidden))
    net = MLPVelocity(
        dim, hidden, act, time_freqs=freqs, num_classes=classes, x_freqs=x_freqs, x_scale=0.7
    ).to(DT)
    if classes:  # the null row starts at zero: make every label matter
        nn.init.normal_(net.inp_y.weight)  # type: ignore[union-attr]
    return net


def inputs(dim: int, classes: int, n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes + 1, (n,), generator=g) if classes else None
    return torch.randn(n, dim, generator=g, dtype=DT), y


def jacobians(net: MLPVelocity, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
    """``(B, d, d)``: ``J[b, i, j] = d v_i / d x_j`` of every row (time 0-dim or per row), by
    reverse mode."""
    ts = t.expand(x.shape[0]) if t.ndim == 0 else t
    ys = torch.zeros(x.shape[0], dtype=torch.long) if y is None else y

    def row(xi: Tensor, ti: Tensor, yi: Tensor) -> Tensor:
        return net(xi[None], ti, None if y is None else yi[None])[0]

    return vmap(jacrev(row))(x, ts, ys)


@pytest.mark.parametrize("spec", NETS, ids=lambda s: IDS(*s))
@pytest.mark.parametrize("per_row_time", [False, True])
def test_exact_terms_match_the_jacobian(spec: tuple, per_row_time: bool) -> None:
    net = make_net(*spec)
    x, y = inputs(spec[0], spec[4])
    t = (
        torch.linspace(0.1, 0.9, x.shape[0], dtype=DT)
        if per_row_time
        else torch.tensor(0.3, dtype=DT)
    )
    jac = jacobians(net, x, t, y)
    out = net.velocity_and_jacobian_terms(x, t, None, frobenius=True, y=y)
    assert out is not None
    v, div, frob = out
    torch.testing.assert_close(v, net(x, t, y), rtol=0, atol=TOL)
    torch.testing.assert_close(div, torch.diagonal(jac, dim1=1, dim2=2).sum(-1), rtol=0, atol=TOL)
    torch.testing.assert_close(frob, jac.pow(2).sum((1, 2)), rtol=0, atol=TOL)
    with torch.no_grad():  # the evaluation kernels (no graph), the trace alone
        v2, div2, frob2 = net.velocity_and_jacobian_terms(x, t, None, y=y)  # type: ignore[misc]
    torch.testing.assert_close(div2, div, rtol=0, atol=TOL)
    assert not frob2.any()


@pytest.mark.parametrize("spec", NETS, ids=lambda s: IDS(*s))
def test_hutchinson_terms_match_the_jacobian(spec: tuple) -> None:
    net = make_net(*spec)
    x, y = inputs(spec[0], spec[4])
    t = torch.tensor(0.7, dtype=DT)
    jac = jacobians(net, x, t, y)
    eps = make_probes(
        tuple(x.shape), 5, kind="gaussian", generator=torch.Generator().manual_seed(3), dtype=DT
    )
    out = net.velocity_and_jacobian_terms(x, t, eps, frobenius=True, y=y)
    assert out is not None
    _, div, frob = out
    je = torch.einsum("bij,kbj->kbi", jac, eps)  # J eps_k
    torch.testing.assert_close(div, (je * eps).sum(2).mean(0), rtol=0, atol=TOL)
    torch.testing.assert_close(frob, je.pow(2).sum(2).mean(0), rtol=0, atol=TOL)


def test_all_sign_probes_give_the_exact_terms() -> None:
    """Averaged over all ``2^d`` Rademacher probes both estimates are exact (unbiasedness)."""
    net = make_net(3, (10, 10), "gelu", 2, 0)
    x, _ = inputs(3, 0)
    t = torch.tensor(0.2, dtype=DT)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=DT)  # (8, 3)
    eps = signs[:, None, :].expand(8, x.shape[0], 3).contiguous()
    _, div_h, frob_h = net.velocity_and_jacobian_terms(x, t, eps, frobenius=True)  # type: ignore[misc]
    _, div, frob = net.velocity_and_jacobian_terms(x, t, None, frobenius=True)  # type: ignore[misc]
    torch.testing.assert_close(div_h, div, rtol=0, atol=TOL)
    torch.testing.assert_close(frob_h, frob, rtol=0, atol=TOL)


@pytest.mark.parametrize("probes", [None, 7])
def test_chunks_of_tangents_give_the_same_terms(
    monkeypatch: pytest.MonkeyPatch, probes: int | None
) -> None:
    net = make_net(10, (16, 8), "relu", 1, 0)
    x, _ = inputs(10, 0)
    t = torch.tensor(0.4, dtype=DT)
    eps = None if probes is None else make_probes(tuple(x.shape), probes, dtype=DT)
    whole = net.velocity_and_jacobian_terms(x, t, eps, frobenius=True)
    monkeypatch.setattr(mlp_jacobian, "TANGENT_BYTES", 1)  # one tangent at a time
    parts = net.velocity_and_jacobian_terms(x, t, eps, frobenius=True)
    assert whole is not None and parts is not None
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_tanh_gelu_and_unsupported_layers() -> None:
    net = make_net(4, (9, 9), "gelu", 0, 0)
    net.body[0] = nn.GELU(approximate="tanh")
    x, _ = inputs(4, 0)
    t = torch.tensor(0.5, dtype=DT)
    jac = jacobians(net, x, t, None)
    _, div, _ = net.velocity_and_jacobian_terms(x, t)  # type: ignore[misc]
    torch.testing.assert_close(div, torch.diagonal(jac, dim1=1, dim2=2).sum(-1), rtol=0, atol=TOL)
    net.body[0] = nn.ELU()  # no derivative rule here: the caller takes autograd
    assert net.velocity_and_jacobian_terms(x, t) is None
    r = integrate_path(Block(net), x, SolverSpec("rk4", 3), create_graph=False)
    with autograd_jacobian_terms():
        ref = integrate_path(Block(net), x, SolverSpec("rk4", 3), create_graph=False)
    torch.testing.assert_close(r.div, ref.div, rtol=0, atol=TOL)


def test_capability_check() -> None:
    net = make_net(2, (8,), "silu", 0, 2)
    block = Block(net)
    assert fused_terms(block) is not None and fused_terms(Reversed(block)) is not None
    assert fused_terms(lambda x, s: x) is None  # any other callable: autograd
    with autograd_jacobian_terms():
        assert fused_terms(block) is None
    x, y = inputs(2, 2)
    s = torch.tensor(0.5, dtype=DT)
    with conditioning(y=y):
        assert block.velocity_and_jacobian_terms(x, s) is not None
        with guidance(1.0):
            assert block.velocity_and_jacobian_terms(x, s) is not None
        with guidance(2.5):  # a guided field: autograd through the guided call
            assert block.velocity_and_jacobian_terms(x, s) is None


def paths_agree(fn: Callable[[], tuple[Tensor, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """``fn()`` is the same through the one-pass and the autograd path (and the one-pass path is
    really taken: its calls are counted)."""
    calls = [0]
    one_pass = MLPVelocity.velocity_and_jacobian_terms

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return one_pass(*args, **kwargs)

    monkeypatch.setattr(MLPVelocity, "velocity_and_jacobian_terms", counted)
    fast = fn()
    assert calls[0] > 0
    with autograd_jacobian_terms():
        slow = fn()
    assert all(a.shape == b.shape for a, b in zip(fast, slow)) and len(fast) == len(slow)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


# fixed steps for every net; the adaptive solver for the smooth ones (it crawls through ReLU kinks)
CASES = [(spec, False) for spec in NETS[:6]] + [(s, True) for s in NETS[:6] if s[2] != "relu"]


@pytest.mark.parametrize(
    ("spec", "adaptive"),
    CASES,
    ids=lambda v: f"d{v[0]}-{v[2]}-c{v[4]}" if isinstance(v, tuple) else str(v),
)
def test_integrand_and_log_prob_through_both_paths(
    spec: tuple, adaptive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    solver = SolverSpec("dopri5", atol=1e-7, rtol=1e-7) if adaptive else SolverSpec("rk4", 4)
    net = make_net(*spec)
    x, y = inputs(spec[0], spec[4], n=5)
    flow = Flow([Block(net), Block(make_net(*spec))], (spec[0],), shift=0.1, scale=1.5).to(DT)
    eps = make_probes(tuple(x.shape), 3, dtype=DT)

    def integrals() -> tuple[Tensor, ...]:
        with conditioning(**({"y": y} if y is not None else {})):
            r = integrate_chain(flow.chain, x, solver, create_graph=False)
            back = integrate_path(Reversed(flow.chain[0]), x, solver, create_graph=False)
            h = integrate_path(
                flow.chain[1], x, solver, probes=eps, jacobian=False, create_graph=False
            )
            with flow.count_nfe() as c:
                lp = flow.log_prob(x, solver=solver)
        nfe = torch.tensor(float(c.nfe), dtype=DT)
        return r.z, r.div, r.kinetic, r.jacobian, back.z, back.div, back.jacobian, h.div, lp, nfe

    paths_agree(integrals, monkeypatch)


@pytest.mark.parametrize(
    ("divergence", "spec"),
    [("exact", s) for s in NETS[:6]] + [("hutchinson", NETS[4])],
    ids=lambda v: f"{v[2]}-d{v[0]}" if isinstance(v, tuple) else v,
)
def test_cnf_and_jko_gradients_through_both_paths(
    divergence: str, spec: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = spec[0]
    x, _ = inputs(d, 0, n=8, seed=5)
    eps = None if divergence == "exact" else make_probes((8, d), 2, dtype=DT)
    jac_weight = 0.2 if divergence == "exact" else 0.0  # Hutchinson norms: two estimators
    spec = (*spec[:4], 0, *spec[5:])  # unconditional: the losses bind no labels
    cnf = Flow([Block(make_net(*spec)), Block(make_net(*spec))], (d,)).to(DT)
    jko = Flow([Block(make_net(*spec))], (d,)).to(DT)

    def losses_and_grads() -> tuple[Tensor, ...]:
        out: list[Tensor] = []
        rk4 = SolverSpec("rk4", 3)
        for flow, loss in (
            (cnf, lambda: likelihood_loss(cnf, x, rk4, eps, kinetic=0.1, jacobian=jac_weight)),
            (jko, lambda: jko_loss(jko, x, 0.7, rk4, eps, kinetic=0.1, jacobian=jac_weight)),
        ):
            flow.zero_grad()
            value = loss().rows.mean()
            value.backward()
            out += [
                value.detach(),
                *(p.grad.clone() for p in flow.parameters() if p.grad is not None),
            ]
        return tuple(out)

    paths_agree(losses_and_grads, monkeypatch)
