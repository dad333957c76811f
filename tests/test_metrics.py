"""Closed-form checks of iterflow.metrics (float64 where tolerances are tight)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma

from iterflow import metrics
from iterflow.errors import InputError
from iterflow.metrics import clouds

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """n points whose sample mean is ``mean`` and unbiased sample covariance is ``cov``, exactly."""
    z = torch.randn(n, mean.shape[0], generator=_gen(seed), dtype=DT)
    z = z - z.mean(0)
    white = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(white, z.T, upper=False).T  # cov(z) = I
    return mean + z @ torch.linalg.cholesky(cov).T


def _psd_sqrt(c: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(c)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _frechet_closed_form(
    m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor
) -> float:
    s1 = _psd_sqrt(c1)
    cross = _psd_sqrt(s1 @ c2 @ s1)
    return float(((m1 - m2) ** 2).sum() + torch.trace(c1 + c2 - 2 * cross))


def _mmd_brute(x: torch.Tensor, y: torch.Tensor, bws: list[float]) -> float:
    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bws)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return float(
        (kxx.sum() - kxx.diag().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


# ---------------------------------------------------------------- W2 ----


def test_w2_of_translate_is_shift_norm() -> None:
    x = torch.randn(300, 3, generator=_gen(1), dtype=DT)
    shift = torch.tensor([0.7, -1.2, 0.4], dtype=DT)
    assert metrics.w2(x, x + shift) == pytest.approx(float(shift.norm()), rel=1e-9)


def test_w2_1d_matches_sorted_matching() -> None:
    x = torch.randn(400, 1, generator=_gen(2), dtype=DT)
    y = torch.rand(400, 1, generator=_gen(3), dtype=DT) * 3.0
    expected = math.sqrt(float(((x.sort(0).values - y.sort(0).values) ** 2).mean()))
    assert metrics.w2(x, y) == pytest.approx(expected, rel=1e-9)


def test_w2_subsampling_is_seeded_and_flattens_trailing_dims() -> None:
    x = torch.randn(500, 2, 2, generator=_gen(4))
    y = torch.randn(500, 4, generator=_gen(5)) + 1.0
    a, b = metrics.w2(x, y, max_n=100, seed=7), metrics.w2(x, y, max_n=100, seed=7)
    assert a == b
    assert a != metrics.w2(x, y, max_n=100, seed=8)


def test_sliced_w2_equals_w2_in_one_dimension() -> None:
    x = torch.randn(300, 1, generator=_gen(6), dtype=DT)
    y = torch.randn(200, 1, generator=_gen(7), dtype=DT) * 0.5 + 1.0  # unequal sizes
    assert metrics.sliced_w2(x, y, n_projections=3) == pytest.approx(metrics.w2(x, y), rel=1e-7)


def test_sliced_w2_of_translate_is_shift_over_sqrt_d() -> None:
    # Projected translate: W2(theta.x, theta.x + theta.s) = |theta.s|; E(theta.s)^2 = |s|^2 / d.
    d = 3
    x = torch.randn(200, d, generator=_gen(8), dtype=DT)
    shift = torch.tensor([1.0, -2.0, 2.0], dtype=DT)  # |s| = 3
    value = metrics.sliced_w2(x, x + shift, n_projections=4000, seed=1)
    assert value == pytest.approx(3.0 / math.sqrt(d), rel=0.03)


# --------------------------------------------------------------- MMD ----


def test_mmd_matches_brute_force_when_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clouds, "BLOCK_ENTRIES", 500)  # force many small chunks
    x = torch.randn(120, 2, generator=_gen(9), dtype=DT)
    y = torch.randn(90, 2, generator=_gen(10), dtype=DT) + 0.3
    bws = [0.5, 1.0, 2.0]
    assert metrics.mmd(x, y, bandwidths=bws) == pytest.approx(_mmd_brute(x, y, bws), rel=1e-10)
    h = metrics.median_heuristic(x, y)
    default_bws = [h * s for s in metrics.DEFAULT_MMD_SCALES]
    assert metrics.mmd(x, y) == pytest.approx(_mmd_brute(x, y, default_bws), rel=1e-10)


def test_mmd_near_zero_for_equal_laws_and_grows_with_shift() -> None:
    x = torch.randn(800, 2, generator=_gen(11), dtype=DT)
    y = torch.randn(800, 2, generator=_gen(12), dtype=DT)
    assert abs(metrics.mmd(x, x)) < 0.02  # unbiased: may be slightly negative
    assert abs(metrics.mmd(x, y)) < 0.01
    values = [metrics.mmd(x, y + s, bandwidths=[1.0]) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))


# ------------------------------------------------------ Gaussian fits ----


def test_frechet_distance_exact_moments_matches_closed_form() -> None:
    m1, m2 = torch.tensor([0.0, 1.0, -1.0], dtype=DT), torch.tensor([0.5, 0.0, 2.0], dtype=DT)
    a = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.8, 0.2], [0.1, 0.0, 1.5]], dtype=DT)
    c1, c2 = a @ a.T, torch.diag(torch.tensor([0.5, 2.0, 1.0], dtype=DT))
    x, y = _exact_moments(500, m1, c1, seed=1), _exact_moments(700, m2, c2, seed=2)
    expected = _frechet_closed_form(m1, c1, m2, c2)
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_large_samples_near_closed_form() -> None:
    m1, m2 = torch.zeros(2, dtype=DT), torch.tensor([1.0, -1.0], dtype=DT)
    c1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)
    c2 = torch.tensor([[0.5, -0.2], [-0.2, 1.5]], dtype=DT)
    n = 100_000
    x = m1 + torch.randn(n, 2, generator=_gen(3), dtype=DT) @ torch.linalg.cholesky(c1).T
    y = m2 + torch.randn(n, 2, generator=_gen(4), dtype=DT) @ torch.linalg.cholesky(c2).T
    expected = _frechet_closed_form(m1, c1, m2, c2)
    assert metrics.frechet_distance(x, y) == pytest.approx(expected, abs=0.05)


def test_frechet_distance_singular_covariance_is_finite() -> None:
    x = torch.randn(5, 10, generator=_gen(5), dtype=DT)  # rank-deficient covariance
    value = metrics.frechet_distance(x, x.clone())
    assert math.isfinite(value) and 0.0 <= value < 1e-4
    assert metrics.frechet_distance(x, x + 1.0) == pytest.approx(10.0, abs=1e-3)


def test_gaussian_kl_to_standard_closed_form() -> None:
    m = torch.tensor([1.0, -0.5], dtype=DT)
    c = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=DT)
    x = _exact_moments(300, m, c)
    expected = 0.5 * float(torch.trace(c) + m @ m - 2 - torch.logdet(c))
    assert metrics.gaussian_kl_to_standard(x) == pytest.approx(expected, rel=1e-9)
    assert (
        metrics.gaussian_kl_to_standard(
            _exact_moments(50, torch.zeros(3, dtype=DT), torch.eye(3, dtype=DT))
        )
        < 1e-12
    )
    assert metrics.gaussian_kl_to_standard(torch.randn(3, 5, generator=_gen(1))) == math.inf


# ------------------------------------------------ neighbours, entropy ----


def test_nearest_neighbor_distance_matches_brute_force() -> None:
    s = torch.randn(37, 4, generator=_gen(6), dtype=DT)
    r = torch.randn(53, 2, 2, generator=_gen(7), dtype=DT)
    got = metrics.nearest_neighbor_distance(s, r, chunk=8)
    expected = torch.cdist(s, r.reshape(53, 4)).min(1).values
    assert got.shape == (37,) and got.dtype == DT
    torch.testing.assert_close(got, expected)
    copies = metrics.nearest_neighbor_distance(r[:5] * 1e3, r * 1e3, chunk=4)
    assert float(copies.abs().max()) == 0.0  # exact copies are at distance exactly 0


def test_knn_entropy_matches_kdtree_reference() -> None:
    x = torch.randn(1500, 3, generator=_gen(8), dtype=DT)  # > one 1024-row chunk
    k = 4
    eps = cKDTree(x.numpy()).query(x.numpy(), k=k + 1)[0][:, k]
    log_vd = 1.5 * math.log(math.pi) - math.lgamma(2.5)
    expected = digamma(1500) - digamma(k) + log_vd + 3 * np.log(eps).mean()
    assert metrics.knn_entropy(x, k=k) == pytest.approx(expected, rel=1e-10)


def test_knn_entropy_of_standard_normal() -> None:
    x = torch.randn(4000, 2, generator=_gen(9), dtype=DT)
    assert metrics.knn_entropy(x) == pytest.approx(math.log(2 * math.pi * math.e), abs=0.05)


def test_kl_to_standard_normal_estimates() -> None:
    z = torch.randn(4000, 2, generator=_gen(10))
    assert abs(metrics.kl_to_standard_normal(z)) < 0.05
    assert metrics.kl_to_standard_normal(z + 1.0) == pytest.approx(1.0, abs=0.07)  # |m|^2 / 2


def test_bits_per_dim() -> None:
    assert metrics.bits_per_dim(math.log(2) * 6, 3) == pytest.approx(2.0)
    assert metrics.bits_per_dim(torch.tensor([1.0, 3.0]) * math.log(2), 2) == pytest.approx(1.0)


# -------------------------------------------------------- bad inputs ----


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: metrics.mmd(torch.zeros(5, 2), torch.zeros(5, 3)), "y"),
        (lambda: metrics.w2(torch.zeros(1, 2), torch.zeros(5, 2)), "x"),
        (
            lambda: metrics.sliced_w2(torch.zeros(4, 2), torch.tensor([[0.0, float("nan")]] * 3)),
            "y",
        ),
        (lambda: metrics.frechet_distance(torch.zeros(4, 2), torch.zeros(4, 1)), "feat_y"),
        (lambda: metrics.gaussian_kl_to_standard([[0.0, 1.0]]), "x"),
        (lambda: metrics.knn_entropy(torch.randn(5, 2), k=5), "k"),
        (lambda: metrics.knn_entropy(torch.zeros(10, 2)), "x"),  # duplicates
        (lambda: metrics.kl_to_standard_normal(torch.tensor([[float("inf"), 0.0]] * 9)), "x"),
        (
            lambda: metrics.nearest_neighbor_distance(torch.zeros(3, 2), torch.zeros(3, 4)),
            "reference",
        ),
        (
            lambda: metrics.mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidths=[1.0, -1.0]),
            "bandwidths",
        ),
        (lambda: metrics.w2(torch.randn(5, 2), torch.randn(5, 2), max_n=1), "max_n"),
        (lambda: metrics.bits_per_dim(1.0, 0), "dim"),
        (lambda: metrics.bits_per_dim(float("nan"), 2), "nll_nats"),
    ],
)
def test_bad_inputs_raise_input_error(call, argument: str) -> None:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        call()
    assert info.value.argument == argument
