"""Time densities of flow matching (:class:`iterflow.core.paths.TimeSampler`, the ``time_*`` options of
:class:`iterflow.methods.fm.FMOptions`): the draws follow the stated densities (KS tests against
scipy), the densities are normalised and equal scipy's, the importance-weighted loss has the
uniform-time loss as its expectation (closed form for a linear field and Gaussian ends), and the
default keeps the old uniform draw bit for bit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats
from torch import Tensor, nn

from iterflow.core.paths import TimeSampler
from iterflow.errors import InputError
from iterflow.methods.fm import FMOptions, flow_matching_loss
from iterflow.train import TrainConfig

CPU = torch.device("cpu")


def draws(sampler: TimeSampler, n: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    s, _ = sampler.sample(n, g, CPU, torch.float64)
    return s.numpy()


def reference_cdf(sampler: TimeSampler) -> object:
    """The sampler's CDF from scipy (with ``mix``: ``m s + (1 - m) F(s)``)."""
    if sampler.mix > 0.0:
        base = reference_cdf(dataclasses.replace(sampler, mix=0.0))
        return lambda s: sampler.mix * s + (1.0 - sampler.mix) * base(s)  # type: ignore[operator]
    if sampler.kind == "uniform":
        return stats.uniform().cdf
    if sampler.kind == "power":
        return stats.beta(1.0 / sampler.power, 1.0).cdf
    return lambda s: stats.norm.cdf((special.logit(s) - sampler.loc) / sampler.scale)


CASES = [
    TimeSampler("uniform"),
    TimeSampler("power", power=2.0),
    TimeSampler("power", power=3.5),
    TimeSampler("power", power=0.6),
    TimeSampler("logit-normal"),
    TimeSampler("logit-normal", loc=-0.8, scale=1.6),
    TimeSampler("logit-normal", loc=1.1, scale=0.5),
    TimeSampler("power", power=3.0, mix=0.2),
    TimeSampler("power", power=0.6, mix=0.5),
    TimeSampler("logit-normal", loc=-0.8, scale=1.6, mix=0.3),
]
IDS = [f"{c.kind}-{c.loc}-{c.scale}-{c.power}-{c.mix}" for c in CASES]


@pytest.mark.parametrize("sampler", CASES, ids=IDS)
def test_draws_follow_the_density(sampler: TimeSampler) -> None:
    s = draws(sampler, 20_000, seed=3)
    assert ((s > 0) & (s < 1)).all()
    ks = stats.kstest(s, reference_cdf(sampler))
    assert ks.pvalue > 1e-3, ks
    # and a KS test can tell another density apart at this size (the test has power)
    other = TimeSampler("power", power=1.3) if sampler.kind != "power" else TimeSampler("uniform")
    assert stats.kstest(draws(other, 20_000, seed=3), reference_cdf(sampler)).pvalue < 1e-3


@pytest.mark.parametrize("sampler", CASES, ids=IDS)
def test_density_is_normalised_and_matches_scipy(sampler: TimeSampler) -> None:
    def p(s: float) -> float:
        return float(sampler.density(torch.tensor(s, dtype=torch.float64)))

    total, _ = integrate.quad(p, 0.0, 1.0, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)
    grid = np.linspace(0.01, 0.99, 41)
    got = sampler.density(torch.tensor(grid)).numpy()
    if sampler.kind == "power":
        want = stats.beta(1.0 / sampler.power, 1.0).pdf(grid)
    elif sampler.kind == "logit-normal":  # change of variables from N(loc, scale^2) on logit(s)
        want = stats.norm.pdf(special.logit(grid), sampler.loc, sampler.scale) / (grid * (1 - grid))
    else:
        want = np.ones_like(grid)
    want = sampler.mix + (1.0 - sampler.mix) * want
    np.testing.assert_allclose(got, want, rtol=1e-10)


class LinearField(nn.Module):
    """``v(x, s) = s A x + b`` (float64)."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return s.reshape(-1, 1) * (x @ self.a.T) + self.b


def loss_at_time(a: np.ndarray, b: np.ndarray, m: np.ndarray, cov0: np.ndarray, s: float) -> float:
    """``E || v(x_s, s) - (x1 - x0) ||^2 / d`` for ``x0 ~ N(m, cov0)``, ``x1 ~ N(0, I)``,
    ``x_s = (1 - s) x0 + s x1``: the error is ``M0 x0 + M1 x1 + b`` with ``M0 = s (1 - s) A + I`` and
    ``M1 = s^2 A - I``."""
    eye = np.eye(len(m))
    m0, m1 = s * (1 - s) * a + eye, s * s * a - eye
    mean = m0 @ m + b
    return float(mean @ mean + np.trace(m0 @ cov0 @ m0.T) + np.trace(m1 @ m1.T)) / len(m)


@pytest.mark.parametrize("dim", [1, 3, 6])
@pytest.mark.parametrize(("power", "mix"), [(2.0, 0.0), (4.0, 0.0), (0.7, 0.0), (3.0, 0.2)])
def test_importance_weighted_loss_has_the_uniform_expectation(
    dim: int, power: float, mix: float
) -> None:
    """Weighted: ``E = int_0^1 L(s) ds`` (the uniform-time loss); unweighted: ``int p(s) L(s) ds``
    with ``p = mix + (1 - mix) Beta(1/k, 1)``."""
    rng = np.random.default_rng(dim * 10 + int(power * 10))
    a = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    b = rng.normal(size=dim) * 0.5
    m = rng.normal(size=dim)
    root = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    cov0 = root @ root.T + 0.2 * np.eye(dim)

    def density(s: float) -> float:
        return mix + (1.0 - mix) * float(stats.beta(1.0 / power, 1.0).pdf(s))

    uniform = integrate.quad(lambda s: loss_at_time(a, b, m, cov0, s), 0.0, 1.0)[0]
    leaning = integrate.quad(lambda s: density(s) * loss_at_time(a, b, m, cov0, s), 0.0, 1.0)[0]

    n = 200_000
    g = torch.Generator().manual_seed(dim)
    chol = torch.tensor(np.linalg.cholesky(cov0))
    x0 = torch.tensor(m) + torch.randn(n, dim, generator=g, dtype=torch.float64) @ chol.T
    x1 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    field = LinearField(torch.tensor(a), torch.tensor(b))
    for weighting, want in (("importance", uniform), ("none", leaning)):
        opts = FMOptions(
            time_sampling="power", time_power=power, time_weighting=weighting, time_mix=mix
        )
        rows = flow_matching_loss(field, x0, x1, opts, torch.Generator().manual_seed(7)).rows
        est, err = float(rows.mean()), float(rows.std()) / math.sqrt(n)
        assert abs(est - want) < 4.5 * err, (weighting, est, want, err)


def test_uniform_default_keeps_the_old_draw() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s, w = TimeSampler().sample(64, g1, CPU, torch.float32)
    assert w is None
    assert torch.equal(s, torch.rand(64, generator=g2))


def test_options_are_validated_and_coerced() -> None:
    cfg = TrainConfig(options={"time_sampling": "power", "time_power": "2"})
    assert cfg.options == {"time_sampling": "power", "time_power": 2.0}
    with pytest.raises(InputError, match="time_sampling"):
        FMOptions(time_sampling="beta")
    with pytest.raises(InputError, match="time_weighting"):
        FMOptions(time_weighting="snr")
    with pytest.raises(InputError, match="time_scale"):
        FMOptions(time_sampling="logit-normal", time_scale=0.0)
    with pytest.raises(InputError, match="time_power"):
        FMOptions(time_sampling="power", time_power=-1.0)
    with pytest.raises(InputError, match="time_loc"):
        FMOptions(time_sampling="logit-normal", time_loc=math.inf)
    with pytest.raises(InputError, match="time_weighting"):  # 1 / p(s) is not square-integrable
        FMOptions(time_sampling="logit-normal", time_weighting="importance")
    # with a uniform floor 1 / p <= 1 / mix is bounded
    FMOptions(time_sampling="logit-normal", time_weighting="importance", time_mix=0.1)
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(InputError, match=r"time_mix.*\[0, 1\)|time_mix"):
            FMOptions(time_sampling="power", time_mix=bad)


def test_mixed_weights_are_bounded_by_the_uniform_floor() -> None:
    sampler = TimeSampler("power", power=3.0, weighting="importance", mix=0.25)
    _, w = sampler.sample(50_000, torch.Generator().manual_seed(2), CPU, torch.float64)
    assert w is not None and float(w.max()) <= 1.0 / 0.25 + 1e-12


def test_the_mlp_time_density_is_not_recommended_for_other_networks() -> None:
    """Flow matching's recommended time density is tuned for the built-in MLP: ``iterflow train``
    and ``fit`` with the MLP use it, a user's module or the U-Net gets uniform times."""
    mlp = TrainConfig.for_method("fm")
    assert mlp.options["time_sampling"] == "power" and mlp.options["time_mix"] > 0
    for network in ("custom", "unet"):
        other = TrainConfig.for_method("fm", network=network)
        assert "time_sampling" not in other.options, network
    given = TrainConfig.for_method("fm", network="custom", options={"time_sampling": "power"})
    assert given.options == {"time_sampling": "power"}  # the user's choice stays
