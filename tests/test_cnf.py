"""Maximum-likelihood CNF (iterflow.methods.cnf) against closed forms, in float64.

A linear field ``v(x) = A x`` with ``A = a I + b J`` (``J`` the 2-D rotation generator) has the flow
``z = e^A x`` and closed forms for every integral the loss uses:
``int div v ds = tr A = 2a``, ``int |v|^2 ds = (a^2 + b^2) |x|^2 (e^{2a} - 1) / (2a)`` and
``||A||_F^2 = 2 (a^2 + b^2)``; ``A`` is normal, so ``|eps^T A|^2 = (a^2 + b^2) |eps|^2`` and
``eps^T A eps = a |eps|^2``: with Rademacher probes the Hutchinson estimates are exact too.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow
from iterflow.core.integrand import integrate_path
from iterflow.core.nn import MLPVelocity
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError
from iterflow.methods import METHODS, parse_options
from iterflow.methods.cnf import CNFOptions, likelihood_loss
from iterflow.train import TrainConfig, train

DT = torch.float64
J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=DT)


class LinearVelocity(nn.Module):
    """``v(x, s) = A x`` (time-independent)."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return x @ self.a.T


def _points(n: int = 64, seed: int = 0) -> Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _closed_form_nll(a_mat: Tensor, x: Tensor) -> Tensor:
    z = x @ torch.linalg.matrix_exp(a_mat).T
    return (0.5 * z.pow(2).sum(1) + math.log(2 * math.pi) - torch.trace(a_mat)).mean()


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_path_integrals_of_a_linear_field(divergence: str) -> None:
    a, b = 0.3, 0.7
    blk = Block(LinearVelocity(a * torch.eye(2, dtype=DT) + b * J))
    x = _points()
    probes = None
    if divergence == "hutchinson":
        signs = torch.randint(0, 2, (2, *x.shape), generator=torch.Generator().manual_seed(1))
        probes = signs.to(DT) * 2 - 1
    r = integrate_path(blk, x, SolverSpec("rk4", 40), probes=probes, create_graph=False)
    z_exact = x @ torch.linalg.matrix_exp(a * torch.eye(2, dtype=DT) + b * J).T
    torch.testing.assert_close(r.z, z_exact, atol=1e-8, rtol=0)
    torch.testing.assert_close(r.div, torch.full_like(r.div, 2 * a), atol=1e-12, rtol=0)
    kin = (a * a + b * b) * x.pow(2).sum(1) * (math.exp(2 * a) - 1) / (2 * a)
    torch.testing.assert_close(r.kinetic, kin, atol=1e-8, rtol=0)
    frob = torch.full_like(r.jacobian, 2 * (a * a + b * b))
    torch.testing.assert_close(r.jacobian, frob, atol=1e-12, rtol=0)


def test_loss_and_gradient_match_the_closed_form_likelihood() -> None:
    a_mat = torch.tensor([[0.2, -0.5], [0.4, -0.1]], dtype=DT)
    vel = LinearVelocity(a_mat)
    stage = Flow([Block(vel)], (2,)).to(DT)
    x = _points(128)
    loss = likelihood_loss(stage, x, SolverSpec("rk4", 24), None, kinetic=0.0, jacobian=0.0)
    loss.value().backward()
    a_ref = a_mat.clone().requires_grad_(True)
    ref = _closed_form_nll(a_ref, x)
    ref.backward()
    assert abs(float(loss.value().detach()) - float(ref.detach())) < 1e-7
    torch.testing.assert_close(vel.a.grad, a_ref.grad, atol=1e-6, rtol=0)


def test_regularisers_enter_the_loss_with_their_weights() -> None:
    a, b = -0.4, 0.5
    stage = Flow([Block(LinearVelocity(a * torch.eye(2, dtype=DT) + b * J))], (2,)).to(DT)
    x = _points(32)
    spec = SolverSpec("rk4", 40)
    plain = likelihood_loss(stage, x, spec, None, kinetic=0.0, jacobian=0.0)
    reg = likelihood_loss(stage, x, spec, None, kinetic=0.3, jacobian=0.2)
    kin = float(((a * a + b * b) * x.pow(2).sum(1) * (math.exp(2 * a) - 1) / (2 * a)).mean())
    expected = float(plain.value().detach()) + 0.3 * kin + 0.2 * 2 * (a * a + b * b)
    assert abs(float(reg.value().detach()) - expected) < 1e-7


@pytest.mark.parametrize("options", [{}, {"divergence": "hutchinson", "probes": 3}])
def test_cnf_loss_equals_minus_mean_log_prob(options: dict) -> None:
    torch.manual_seed(0)
    blocks = [Block(MLPVelocity(2, hidden=(16, 16), activation="tanh")) for _ in range(2)]
    stage = Flow(blocks, (2,)).to(DT)
    method = METHODS["cnf"](
        parse_options(METHODS["cnf"], {"steps": 5, **options}), event_shape=(2,), num_blocks=2
    )
    x = _points(50)
    loss = method.loss(stage, (x,), 0, torch.Generator().manual_seed(7))
    lp = stage.log_prob(
        x,
        solver="rk4",
        steps=5,
        divergence=options.get("divergence", "auto"),
        probes=options.get("probes", 1),
        generator=torch.Generator().manual_seed(7),
    )
    assert abs(float(loss.value().detach()) + float(lp.mean().detach())) < 1e-10
    assert abs(float(loss.terms["nll"].mean()) - float(loss.value().detach())) < 1e-12


def test_adaptive_training_solver_is_differentiable() -> None:
    a_mat = torch.tensor([[0.1, 0.3], [-0.2, 0.05]], dtype=DT)
    vel = LinearVelocity(a_mat)
    stage = Flow([Block(vel)], (2,)).to(DT)
    x = _points(16)
    loss = likelihood_loss(
        stage, x, SolverSpec("dopri5", atol=1e-9, rtol=1e-9), None, kinetic=0.0, jacobian=0.0
    )
    loss.value().backward()
    a_ref = a_mat.clone().requires_grad_(True)
    _closed_form_nll(a_ref, x).backward()
    torch.testing.assert_close(vel.a.grad, a_ref.grad, atol=1e-6, rtol=0)


def test_cnf_trains_blocks_jointly_toward_the_entropy_floor(tmp_path: Path) -> None:
    """On ``N(m, s^2 I)`` data the per-stage proxy ``E[|z|^2/2 - log det]`` starts at
    ``(|m|^2 + 2 s^2) / 2`` (identity map) and is bounded below by its value at the exact model,
    ``H(p) - log(2 pi) = 1 + 2 log s`` in two dimensions (the NLL cannot beat the entropy)."""
    m, s = np.array([1.0, -0.5]), 0.5
    x = m + s * np.random.default_rng(0).standard_normal((3000, 2))
    np.save(tmp_path / "gauss.npy", x.astype(np.float32))
    cfg = TrainConfig(
        method="cnf", data=str(tmp_path / "gauss.npy"), blocks=2, steps=80, batch_size=256,
        lr=1e-2, hidden=(16, 16), activation="tanh", n_train=2400, n_val=300, n_test=300,
        standardize=False, dtype="float64", ema=0.9, log_every=20,
        options={"steps": 2, "push_steps": 8},
    )  # fmt: skip
    res = train(cfg, tmp_path / "run")
    assert len(res.history) == 1 and res.history[0]["blocks"] == [0, 1]
    assert res.flow.num_blocks == 2
    start = 0.5 * (float(m @ m) + 2 * s * s)
    floor = 1 + 2 * math.log(s)
    proxy = res.history[0]["kl_proxy"]
    assert floor - 0.1 < proxy < floor + 0.25 * (start - floor), (proxy, floor, start)


@pytest.mark.parametrize(
    "raw",
    [
        {"solver": "nope"},
        {"steps": "0"},
        {"divergence": "trace"},
        {"probes": "0"},
        {"probe_kind": "uniform"},
        {"kinetic": "-1"},
        {"jacobian": "x"},
        {"bogus": "1"},
    ],
)
def test_bad_options_name_the_option(raw: dict) -> None:
    with pytest.raises(InputError) as err:
        parse_options(METHODS["cnf"], raw)
    assert next(iter(raw)) in str(err.value)


def test_options_defaults_are_valid() -> None:
    o = CNFOptions()
    assert o.train_spec().name == "rk4" and not METHODS["cnf"].progressive
