"""Flow maps and likelihoods against closed forms (linear velocity fields: Gaussian <-> Gaussian)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from iterflow.core.flow import Block, Flow, standard_normal_log_prob
from iterflow.core.nn import MLPVelocity
from iterflow.errors import InputError


class LinearVelocity(nn.Module):
    """v(x, s) = (A + s B) x: the flow map of a block is expm(A + B/2) when A and B commute."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
        return x @ self.a.T + s * (x @ self.b.T)


def gaussian_flow() -> tuple[Flow, torch.Tensor]:
    """Two blocks with diagonal (commuting) linear fields; returns the flow and the total map M (z = M u)."""
    a1, b1 = torch.diag(torch.tensor([0.5, -0.3, 0.2])), torch.diag(torch.tensor([0.2, 0.1, -0.4]))
    a2, b2 = torch.diag(torch.tensor([-0.1, 0.4, 0.3])), torch.zeros(3, 3)
    blocks = [Block(LinearVelocity(a1, b1)), Block(LinearVelocity(a2, b2))]
    shift, scale = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.5])
    flow = Flow(blocks, (3,), shift=shift, scale=scale).double()
    m = torch.matrix_exp((a2 + b2 / 2).double()) @ torch.matrix_exp((a1 + b1 / 2).double())
    return flow, m


def exact_log_prob(flow: Flow, m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    u = (x - flow.shift) / flow.scale
    z = u @ m.T
    return standard_normal_log_prob(z) + torch.logdet(m) - flow.scale.log().sum()


@pytest.mark.parametrize("solver,steps,tol", [("rk4", 32, 1e-8), ("dopri5", 16, 1e-6)])
def test_log_prob_exact_divergence(solver: str, steps: int, tol: float) -> None:
    flow, m = gaussian_flow()
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        lp = flow.log_prob(
            x, divergence="exact", solver=solver, steps=steps, atol=1e-10, rtol=1e-10
        )
    assert torch.allclose(lp, exact_log_prob(flow, m, x), atol=tol)


def test_log_prob_hutchinson_is_seeded_and_exact_for_a_diagonal_field() -> None:
    flow, m = gaussian_flow()
    x = torch.randn(20, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = flow.log_prob(
            x,
            divergence="hutchinson",
            probes=2000,
            generator=torch.Generator().manual_seed(3),
            solver="rk4",
            steps=16,
        )
        b = flow.log_prob(
            x,
            divergence="hutchinson",
            probes=2000,
            generator=torch.Generator().manual_seed(3),
            solver="rk4",
            steps=16,
        )
    assert torch.equal(a, b)
    # For a diagonal field Rademacher probes give the exact trace: eps^T D eps = tr D.
    assert torch.allclose(a, exact_log_prob(flow, m, x), atol=1e-8)


def test_log_prob_hutchinson_gaussian_probes_mean() -> None:
    flow, m = gaussian_flow()
    x = torch.zeros(1, 3, dtype=torch.float64).expand(400, 3).clone()
    with torch.no_grad():
        lp = flow.log_prob(
            x,
            divergence="hutchinson",
            probes=1,
            probe_kind="gaussian",
            generator=torch.Generator().manual_seed(0),
            solver="rk4",
            steps=8,
        )
    exact = exact_log_prob(flow, m, x[:1])
    assert abs(float(lp.mean() - exact)) < 5 * float(lp.std()) / math.sqrt(400)
    assert float(lp.std()) > 0  # Gaussian probes are noisy on a diagonal field


def test_encode_matches_linear_map_and_decode_inverts() -> None:
    flow, m = gaussian_flow()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = flow.encode(x, solver="dopri5", atol=1e-10, rtol=1e-10)
        assert torch.allclose(z, ((x - flow.shift) / flow.scale) @ m.T, atol=1e-8)
        back = flow.decode(z, solver="dopri5", atol=1e-10, rtol=1e-10)
    assert torch.allclose(back, x, atol=1e-8)


def test_mlp_flow_round_trip_and_nfe() -> None:
    torch.manual_seed(0)
    flow = Flow([Block(MLPVelocity(2, hidden=(32, 32))) for _ in range(3)], (2,)).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad(), flow.count_nfe() as c:
        z = flow.encode(x, solver="rk4", steps=5)
    assert c.nfe == 3 * 5 * 4
    with torch.no_grad():
        back = flow.decode(
            flow.encode(x, solver="dopri5", atol=1e-10, rtol=1e-10),
            solver="dopri5",
            atol=1e-10,
            rtol=1e-10,
        )
    assert torch.allclose(back, x, atol=1e-7)
    with torch.no_grad():
        traj = flow.trajectory(x, direction="encode", solver="rk4", steps=5)
    assert traj.shape == (16, 64, 2)
    assert torch.allclose(traj[-1], z) and torch.allclose(traj[0], x)
    with torch.no_grad():
        parts = flow.encode_by_block(x, solver="rk4", steps=5)
    assert len(parts) == 4 and torch.allclose(parts[-1], z)


def test_sample_is_seeded_and_in_data_units() -> None:
    flow, _ = gaussian_flow()
    with torch.no_grad():
        a = flow.sample(5000, generator=torch.Generator().manual_seed(0), solver="rk4", steps=8)
        b = flow.sample(5000, generator=torch.Generator().manual_seed(0), solver="rk4", steps=8)
    assert torch.equal(a, b)
    assert torch.allclose(a.mean(0), flow.shift, atol=0.15)


def test_log_prob_is_differentiable_in_grad_mode() -> None:
    flow, _ = gaussian_flow()
    x = torch.randn(8, 3, dtype=torch.float64)
    lp = flow.log_prob(x, solver="rk4", steps=4)
    lp.mean().backward()
    assert flow.blocks[0].velocity.a.grad is not None


def test_bad_inputs_name_the_argument() -> None:
    flow, _ = gaussian_flow()
    with pytest.raises(InputError, match=r"x: must have shape \(batch, 3\)"):
        flow.encode(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="finite"):
        flow.log_prob(torch.tensor([[0.0, float("nan"), 1.0]], dtype=torch.float64))
    with pytest.raises(InputError, match="torch.Tensor"):
        flow.encode([[0.0, 0.0, 0.0]])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="divergence"):
        flow.log_prob(torch.zeros(1, 3, dtype=torch.float64), divergence="trace")
    with pytest.raises(InputError, match="n: must be a positive integer"):
        flow.sample(0)
    with pytest.raises(InputError, match="solver"):
        flow.encode(torch.zeros(1, 3, dtype=torch.float64), solver="rk45")
    with pytest.raises(InputError, match="scale"):
        Flow([], (2,), scale=torch.tensor([1.0, 0.0]))
