"""JKO-flow's step-size schedules, movement-based stopping and per-block diagnostics
(iterflow.methods.jko_schedule): the adaptive schedule's documented sequence, the schedule kept
across a resume, the stopping rule on a constructed case, and the KL / W2 estimators against closed
forms of Gaussians."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_jko import _small_cfg as jko_small_cfg  # the tests folder is on sys.path
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError
from iterflow.methods.jko import JKOOptions
from iterflow.methods.jko_schedule import gamma_sequence, knn_kl_with_error, prefix_kl, w2_movement
from iterflow.train import RunDir, TrainConfig, train

DT = torch.float64


def test_adaptive_schedule_follows_the_documented_rule() -> None:
    # gamma_{n+1} = gamma_n * clip(m_1 / m_n, 1, growth), capped by gamma_max
    m = [1.0, 0.5, 0.8, 2.0]
    assert gamma_sequence(0.5, "adaptive", 3.0, 0.0, m) == pytest.approx(
        [0.5, 0.5, 1.0, 1.25, 1.25]
    )
    assert gamma_sequence(0.5, "adaptive", 1.5, 0.0, m) == pytest.approx(
        [0.5, 0.5, 0.75, 0.9375, 0.9375]
    )
    assert gamma_sequence(0.5, "adaptive", 3.0, 0.9, m) == pytest.approx([0.5, 0.5, 0.9, 0.9, 0.9])
    # the options' gamma_at reads the same sequence; the fixed schedules ignore movements
    o = JKOOptions(gamma=0.5, gamma_schedule="adaptive", gamma_growth=3.0)
    assert [o.gamma_at(i, tuple(m[:i])) for i in range(5)] == pytest.approx(
        gamma_sequence(0.5, "adaptive", 3.0, 0.0, m)
    )
    assert gamma_sequence(0.5, "geometric", 2.0, 0.0, m) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert gamma_sequence(0.5, "constant", 2.0, 0.0, m) == [0.5] * 5


@pytest.mark.parametrize("d", [1, 3, 5])
def test_w2_movement_and_its_standard_error(d: int) -> None:
    g = torch.Generator().manual_seed(d)
    x = torch.randn(4000, d, generator=g, dtype=DT)
    c = torch.randn(d, generator=g, dtype=DT)
    shifted = w2_movement(x, x + c)
    assert shifted["w2_movement"] == pytest.approx(float(c.norm()), rel=1e-12)
    assert shifted["w2_movement_se"] == pytest.approx(0.0, abs=1e-12)
    # scaling by a: squared displacement (a-1)^2 |x|^2, mean (a-1)^2 d; the error of the sample
    # mean is checked against the spread of independent replications
    a = 1.5
    est = [w2_movement(y, a * y) for y in torch.randn(200, 500, d, generator=g, dtype=DT)]
    values = torch.tensor([e["w2_movement"] for e in est], dtype=DT)
    assert float(values.mean()) == pytest.approx((a - 1) * math.sqrt(d), rel=0.01)
    se = float(torch.tensor([e["w2_movement_se"] for e in est]).mean())
    assert se == pytest.approx(float(values.std()), rel=0.2)


class AffineVelocity(nn.Module):
    """``v(x, s) = alpha x + c``: the flow map ``e^alpha x + c (e^alpha - 1) / alpha``."""

    def __init__(self, alpha: float, c: Tensor) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha, dtype=DT))
        self.c = nn.Parameter(c.to(DT))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.alpha * x + self.c


def gaussian_kl(mu: Tensor, sigma: float) -> float:
    """``KL(N(mu, sigma^2 I_d) || N(0, I_d))``."""
    d = mu.shape[0]
    return 0.5 * (d * sigma**2 + float(mu @ mu) - d - 2 * d * math.log(sigma))


@pytest.mark.parametrize("d", [1, 2, 4])
def test_prefix_kl_matches_the_closed_form_of_an_affine_chain(d: int) -> None:
    g = torch.Generator().manual_seed(10 + d)
    m, s = torch.randn(d, generator=g, dtype=DT), 0.7
    shift, scale = torch.full((d,), 0.3, dtype=DT), torch.full((d,), 1.2, dtype=DT)
    blocks = [(-0.4, torch.randn(d, generator=g, dtype=DT) * 0.3), (0.2, -0.1 * torch.ones(d))]
    flow = Flow(
        [Block(AffineVelocity(a, c)) for a, c in blocks], (d,), shift=shift, scale=scale
    ).to(DT)
    x = m + s * torch.randn(20000, d, generator=g, dtype=DT)
    log_p = -0.5 * ((x - m) / s).pow(2).sum(1) - d * math.log(s) - 0.5 * d * math.log(2 * math.pi)
    est = prefix_kl(flow, x, log_p, solver=SolverSpec("rk4", 32))
    # closed form: the particles stay Gaussian N(mu, sigma^2 I) through the affine maps
    mu, sigma = (m - shift) / scale, s / float(scale[0])
    expected = [gaussian_kl(mu, sigma)]
    for a, c in blocks:
        ea = math.exp(a)
        mu, sigma = ea * mu + c.to(DT) * (ea - 1) / a, ea * sigma
        expected.append(gaussian_kl(mu, sigma))
    for (kl, se), want in zip(est, expected, strict=True):
        assert se > 0 and abs(kl - want) < 4 * se + 1e-6, (est, expected)


def test_knn_kl_error_covers_a_known_kl() -> None:
    g = torch.Generator().manual_seed(3)
    m = torch.tensor([1.0, -0.5], dtype=DT)
    est, se = knn_kl_with_error(m + torch.randn(4000, 2, generator=g, dtype=DT))
    assert se > 0 and abs(est - float(m @ m) / 2) < 4 * se + 0.03


def _gaussian_file(tmp_path: Path, mean: float, n: int = 2400) -> str:
    x = mean + 0.8 * np.random.default_rng(0).standard_normal((n, 2))
    path = tmp_path / f"gauss{mean}.npy"
    np.save(path, x.astype(np.float64))
    return str(path)


def _small_cfg(data: str, **kw: object) -> TrainConfig:
    """tests/test_jko.py's small JKO-flow run, shorter (40 steps per block, 2,000 rows)."""
    return jko_small_cfg(data, **{"steps": 40, "n_train": 2000, "n_test": 100, **kw})


def test_movement_rule_stops_once_a_block_barely_moves(tmp_path: Path) -> None:
    """Data N(0, 0.64 I) lies next to the target: the exact JKO step (gamma = 0.5) only widens it, a
    movement E|x_1 - x_0|^2 = d (sigma_1 - 0.8)^2 of about 0.01; data N(4, 0.64 I) moves its mean
    by |m| gamma / (1 + gamma), a movement of about 7. The same tolerance 0.1 stops the first chain
    after one block and lets the second one run."""
    opts = {"gamma": 0.5, "substeps": 2, "push_steps": 8, "stop_tol": 0.1}
    near = train(_small_cfg(_gaussian_file(tmp_path, 0.0), options=opts), tmp_path / "near")
    assert len(near.history) == 1 and near.history[0]["movement"] < 0.1
    far = train(_small_cfg(_gaussian_file(tmp_path, 4.0), options=opts), tmp_path / "far")
    assert len(far.history) >= 2 and far.history[0]["movement"] > 0.1
    for r in far.history:
        assert r["w2_movement"] == pytest.approx(math.sqrt(r["movement"]), rel=1e-9)
        assert r["w2_movement_se"] > 0 and "kl_to_normal_se" in r


def test_adaptive_schedule_survives_a_resume(tmp_path: Path) -> None:
    opts = {"gamma": 0.3, "substeps": 1, "push_steps": 8, "gamma_schedule": "adaptive",
            "gamma_growth": 2.0, "jacobian": 0.1, "jacobian_schedule": "gamma"}  # fmt: skip
    cfg = _small_cfg(_gaussian_file(tmp_path, 2.0), steps=20, checkpoint_every=5, options=opts)
    ref = train(cfg, tmp_path / "a")
    gammas = [r["gamma"] for r in ref.history]
    moves = [r["w2_movement"] for r in ref.history]
    assert gammas == pytest.approx(gamma_sequence(0.3, "adaptive", 2.0, 0.0, moves[:-1]))
    assert gammas[-1] > gammas[0]  # the movement fell, so gamma grew
    # jacobian_schedule=gamma: each block's Jacobian weight is jacobian * gamma_1 / gamma_n
    assert [r["jacobian_weight"] for r in ref.history] == pytest.approx(
        [0.1 * 0.3 / g for g in gammas]
    )
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", stop_after_steps=47)  # inside block 3, after step 7
    assert RunDir(tmp_path / "b").progress_meta.exists()
    res = train(cfg, tmp_path / "b")
    assert [r["gamma"] for r in res.history] == pytest.approx(gammas)
    for pa, pb in zip(ref.flow.state_dict().values(), res.flow.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


def test_jacobian_schedule_weights_and_validation() -> None:
    const = JKOOptions(gamma=0.5, jacobian=0.2)
    scaled = JKOOptions(gamma=0.5, jacobian=0.2, jacobian_schedule="gamma")
    for g in (0.5, 1.0, 4.0):
        assert const.jacobian_at(g) == 0.2
        assert scaled.jacobian_at(g) == pytest.approx(0.2 * 0.5 / g)
    with pytest.raises(InputError, match="jacobian_schedule"):
        JKOOptions(jacobian_schedule="cosine")
