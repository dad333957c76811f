r"""Random Gaussian problems with closed-form answers, and the checks of iterflow against them.

Used by the sweep ``benchmarks/bench_closed_form.py`` and by the fast subset
``tests/test_closed_forms.py``. A problem is drawn from ``(d, seed)``: a mean in a random direction
with norm ``sqrt(d) * U(0.5, 1.5)`` and a covariance ``U diag(s_i^2) U^T`` with ``U`` Haar-random
orthogonal and standard deviations ``s_i`` log-uniform in ``[0.5, 2]``. Every check returns
:class:`Check` rows (an error next to its tolerance; ``tol=None``: reported, not judged).

Each case is a function ``case(d, seed, budget) -> list[Check]`` in :data:`CASES`; ``budget`` is
``"test"`` (small networks and few steps, for the test suite and ``--quick``) or ``"default"`` (the
library's default or recommended settings: what a user gets without knowing which flags to change).
The closed forms themselves are in :mod:`closed_forms` (derivations in their docstrings); the
checks that train networks live in :mod:`closed_form_training`.

Errors: means ``|mu_hat - mu| / |mu|``, covariances ``||S_hat - S||_F / ||S||_F`` (relative);
statistical checks (a loss's stationarity, Hutchinson's unbiasedness) compare a sample mean with
four of its standard errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from closed_forms import (
    DT,
    Gaussian,
    LinearVelocity,
    OUBridgeVelocity,
    StraightAffineVelocity,
    draw_gamma,
    finite_data_velocity,
    generator,
    jko_gaussian_objective,
    jko_gaussian_step,
    moments,
    ot_pair,
    ou_gaussian_step,
    random_gaussian,
    worst_case_problem,
)
from scipy.optimize import minimize
from torch import Tensor, nn

from iterflow.apps.dro import gradient_ascent
from iterflow.apps.ot import gaussian_ot_flow, gaussian_w2_sq, transport_cost
from iterflow.core.flow import Block, Flow
from iterflow.core.rectified import ClosedFormVelocity
from iterflow.methods import METHODS, parse_options
from iterflow.methods.fm import FMOptions, flow_matching_loss

Z_TOL = 4.0  # statistical checks: |sample mean| <= 4 standard errors


@dataclass(frozen=True)
class Check:
    """One compared quantity: ``error`` against ``tol`` (``None``: reported only)."""

    case: str
    d: int
    seed: int
    quantity: str
    error: float
    tol: float | None
    note: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool | None:
        """Within tolerance (``None`` when only reported)."""
        return None if self.tol is None else bool(self.error <= self.tol)

    def row(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def rel(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius for matrices)."""
    return float((a - b).norm() / b.norm())


def moment_checks(
    case: str, d: int, seed: int, x: Tensor, want: Gaussian, tol: float | None, prefix: str = ""
) -> list[Check]:
    """Mean and covariance of the points ``x`` against ``want``."""
    mu, cov = moments(x)
    return [
        Check(case, d, seed, f"{prefix}mean", rel(mu, want.mean), tol),
        Check(case, d, seed, f"{prefix}cov", rel(cov, want.cov), tol),
    ]


def z_check(
    case: str, d: int, seed: int, quantity: str, values: Tensor, floor: float = 1e-9
) -> Check:
    """``|mean(values)|`` against four standard errors (plus ``floor``, for estimates whose variance
    vanishes): a statistical test of ``E values = 0``."""
    v = values.double()
    se = float(v.std() / math.sqrt(v.numel()))
    z = float(v.mean()) / se if se > 0 else 0.0
    return Check(case, d, seed, quantity, abs(float(v.mean())), Z_TOL * se + floor, f"z={z:+.2f}")


def stationarity(
    loss_rows: Callable[[nn.Module], Tensor], velocity: nn.Module, perturbations: list[nn.Module]
) -> Tensor:
    """Per-row directional derivatives ``delta . (v - target)`` of a regression loss at ``velocity``.

    ``loss_rows(module)`` must draw the same minibatch every call (a freshly seeded generator) and
    return the per-row squared errors ``|module(x) - target|^2`` (summed over entries). With
    ``v +- delta`` their difference is ``4 delta . (v - target)`` exactly (a polynomial identity),
    so the returned values, one column per perturbation, have mean zero iff ``v`` is the minimiser
    ``E[target | x]`` along every ``delta`` (up to sampling error).
    """
    cols = []
    for delta in perturbations:
        plus, minus = Perturbed(velocity, delta, 1.0), Perturbed(velocity, delta, -1.0)
        with torch.no_grad():
            dim = loss_rows(plus) - loss_rows(minus)
        cols.append(dim / 4.0)
    return torch.stack(cols, 1)


class Perturbed(nn.Module):
    """``v(x, s) + h delta(x, s)``."""

    def __init__(self, base: nn.Module, delta: nn.Module, h: float) -> None:
        super().__init__()
        self.base, self.delta, self.h = base, delta, h

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        return self.base(x, s) + self.h * self.delta(x, s)


class RandomField(nn.Module):
    """A smooth random perturbation ``tanh(x W + s u + c) V`` (float64, fixed)."""

    def __init__(self, d: int, g: torch.Generator, width: int = 16) -> None:
        super().__init__()
        self.w = torch.randn(d, width, generator=g, dtype=DT) / math.sqrt(d)
        self.u = torch.randn(width, generator=g, dtype=DT)
        self.c = torch.randn(width, generator=g, dtype=DT)
        self.v = torch.randn(width, d, generator=g, dtype=DT) / math.sqrt(width)

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        st = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1)
        return torch.tanh(x @ self.w + st * self.u + self.c) @ self.v


# ------------------------------------------------------------------------------------------------
# JKO-flow
# ------------------------------------------------------------------------------------------------


def case_jko(d: int, seed: int, budget: str = "test") -> list[Check]:
    """The JKO step of ``KL(. || N(0, I))`` from ``N(m, S)`` (:func:`closed_forms.jko_gaussian_step`).

    * ``minimiser`` (up to 10-D; 5-D for budget ``test``): a direct minimisation over Gaussians
      ``N(mu, L L^T)`` (scipy L-BFGS on the objective with the Bures distance of
      :func:`iterflow.apps.ot.gaussian_w2_sq`) lands on the closed form, and the closed form's
      objective is not above the numerical minimum.
    * ``affine``: JKO-flow's plain objective (``METHODS["jko"].loss`` with ``straightness=0``, exact
      trace, RK4) minimised over time-constant fields ``v = B x + c`` on exact-moment points pushes
      them to the closed form.
    * ``straight``: the objective with the straightness term (``straightness=1``: the transport
      term becomes the kinetic energy) minimised over the straight displacement fields of affine
      maps (:class:`closed_forms.StraightAffineVelocity`) does too: the term does not move the step.
    """
    g = generator(1, d, seed)
    p, gamma = random_gaussian(d, g), draw_gamma(g)
    want = jko_gaussian_step(p, gamma)
    out = []
    if d <= (10 if budget == "default" else 5):  # scipy with numerical gradients: slow above
        mu, cov, j_num = minimise_over_gaussians(p, gamma)
        j_closed = jko_gaussian_objective(p, want.mean, want.cov, gamma)
        out += [
            Check("jko", d, seed, "minimiser_mean", rel(mu, want.mean), 1e-4, f"gamma={gamma:.3f}"),
            Check("jko", d, seed, "minimiser_cov", rel(cov, want.cov), 1e-4),
            Check(
                "jko",
                d,
                seed,
                "objective_gap",
                max(0.0, j_closed - j_num),
                1e-9 * max(1.0, abs(j_num)),
            ),
        ]
    linear = fit_affine_jko(p, gamma, g, LinearVelocity(d), {"straightness": 0.0})
    out += moment_checks("jko", d, seed, linear, want, 1e-5, "affine_")
    straight = fit_affine_jko(p, gamma, g, StraightAffineVelocity(d), {"straightness": 1.0})
    out += moment_checks("jko", d, seed, straight, want, 1e-5, "straight_")
    return out


def minimise_over_gaussians(p: Gaussian, gamma: float) -> tuple[Tensor, Tensor, float]:
    """``argmin_{mu, L} KL(N(mu, LL^T) || N(0, I)) + W2^2(p, N(mu, LL^T)) / (2 gamma)`` by L-BFGS."""
    d = p.dim
    rows, cols = torch.tril_indices(d, d)

    def unpack(theta: Any) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(theta, dtype=DT)
        low = torch.zeros(d, d, dtype=DT)
        low[rows, cols] = t[d:]
        return t[:d], low @ low.T

    def objective(theta: Any) -> float:
        mu, cov = unpack(theta)
        return jko_gaussian_objective(p, mu, cov, gamma)

    chol0 = torch.linalg.cholesky(p.cov)[rows, cols]
    theta0 = torch.cat([p.mean, chol0]).numpy()
    res = minimize(
        objective,
        theta0,
        method="L-BFGS-B",
        options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10},
    )
    mu, cov = unpack(res.x)
    return mu, cov, float(res.fun)


def fit_affine_jko(
    p: Gaussian,
    gamma: float,
    g: torch.Generator,
    vel: nn.Module,
    options: dict[str, Any],
    n: int = 256,
) -> Tensor:
    """Minimise JKO-flow's loss (step ``gamma``, RK4 over 8 sub-steps, exact trace, ``options``) over
    the parameters of ``vel`` (an affine family) on exact-moment points of ``p``; returns those points
    pushed by the fitted block (the training solver). For an affine flow the loss depends on the
    points through their first two moments only, so a few hundred suffice."""
    x = p.exact_sample(n, g)
    method_cls = METHODS["jko"]
    opts = {"gamma": gamma, "substeps": 8, "divergence": "exact", **options}
    method = method_cls(parse_options(method_cls, opts), event_shape=(p.dim,), num_blocks=1)
    stage = Flow([Block(vel)], (p.dim,)).to(DT)
    opt = torch.optim.LBFGS(vel.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = method.loss(stage, (x,), 0, torch.Generator().manual_seed(0)).value()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        return stage.encode(x, solver="rk4", steps=8)


# ------------------------------------------------------------------------------------------------
# Local flow matching
# ------------------------------------------------------------------------------------------------


def case_local_fm(d: int, seed: int, budget: str = "test") -> list[Check]:
    """One OU step of local flow matching from ``N(m, S)``: ``N(e^-h m, e^-2h S + (1 - e^-2h) I)``.

    * ``targets``: the method's right ends ``x_r`` (``LocalFlowMatching.targets``) have the OU
      step's moments (statistical tolerance: four standard errors of the sample moments).
    * ``bridge``: the closed-form regression target :class:`closed_forms.OUBridgeVelocity` carries
      ``N(m, S)`` to the OU step exactly (its flow, RK4 with 32 steps).
    * ``stationarity``: the method's loss is stationary at that velocity in random directions (it is
      the loss's minimiser: what a block converges to).
    """
    g = generator(2, d, seed)
    p = random_gaussian(d, g)
    h = float(torch.empty(1, dtype=DT).uniform_(0.1, 1.0, generator=g))
    want = ou_gaussian_step(p, h)
    method_cls = METHODS["local-fm"]
    method = method_cls(parse_options(method_cls, {"hs": [h], "final_block": False}),
                        event_shape=(d,), num_blocks=1)  # fmt: skip
    n = 2**16 if budget == "test" else 2**17
    x = p.exact_sample(n, g)
    xr = method.targets(x, 0, generator(3, d, seed))
    mu, cov = moments(xr)
    # x_l has exact moments, so the only randomness is g: mean(x_r) - e^-h m = b mean(g), and
    # cov(x_r) - want = b^2 (cov(g) - I) + a b (X^T G + G^T X) / n; their expected squared norms
    # are b^2 d / n and (b^4 d (d + 1) + 2 a^2 b^2 (d + 1) tr S) / n.
    a2 = math.exp(-2 * h)
    b2 = 1 - a2
    tol_mu = Z_TOL * math.sqrt(b2 * d / n) / float(want.mean.norm())
    var_cov = (b2 * b2 * d * (d + 1) + 2 * a2 * b2 * (d + 1) * float(torch.trace(p.cov))) / n
    tol_cov = Z_TOL * math.sqrt(var_cov) / float(want.cov.norm())
    out = [
        Check("local_fm", d, seed, "targets_mean", rel(mu, want.mean), tol_mu, f"h={h:.3f}"),
        Check("local_fm", d, seed, "targets_cov", rel(cov, want.cov), tol_cov),
    ]
    bridge = OUBridgeVelocity(p, h)
    flow = Flow([Block(bridge)], (d,)).to(DT)
    with torch.no_grad():
        pushed = flow.encode(p.exact_sample(4096, g), solver="rk4", steps=32)
    out += moment_checks("local_fm", d, seed, pushed, want, 1e-6, "bridge_")
    stage = Flow([Block(bridge)], (d,)).to(DT)

    def rows(module: nn.Module) -> Tensor:
        stage.blocks[0].velocity = module  # type: ignore[union-attr]
        return method.loss(stage, (x,), 0, generator(4, d, seed)).rows * d

    fields = [RandomField(d, g) for _ in range(3)]
    values = stationarity(rows, bridge, fields)
    out += [
        z_check("local_fm", d, seed, f"stationarity_{k}", values[:, k]) for k in range(len(fields))
    ]
    return out


# ------------------------------------------------------------------------------------------------
# Log densities of Gaussian-to-Gaussian flows
# ------------------------------------------------------------------------------------------------


def case_log_density(d: int, seed: int, budget: str = "test") -> list[Check]:
    """``Flow.log_prob`` of the exact OT flow from ``N(m, S)`` to ``N(0, I)`` is ``log N(x; m, S)``.

    The flow (:func:`iterflow.apps.ot.gaussian_ot_flow`, two blocks) runs in model units behind a
    random normalisation ``u = (x - shift) / scale``; the exact data density is then that of
    ``N(shift + scale m, diag(scale) S diag(scale))``. Checked: the default call (dopri5, exact trace
    up to 16 dimensions, Hutchinson above), a tight exact-trace call, the unbiasedness of
    Hutchinson's estimate, and the moments of ``Flow.sample`` (decoding exact-moment noise).
    """
    g = generator(5, d, seed)
    u = random_gaussian(d, g)
    shift = torch.randn(d, generator=g, dtype=DT)
    scale = torch.exp(torch.empty(d, dtype=DT).uniform_(-0.5, 0.5, generator=g))
    core = gaussian_ot_flow(
        u.mean, u.cov, torch.zeros(d, dtype=DT), torch.eye(d, dtype=DT), blocks=2
    )
    flow = Flow(list(core.chain), (d,), shift=shift, scale=scale).to(DT)
    data = Gaussian(shift + scale * u.mean, scale[:, None] * u.cov * scale[None, :])
    x = data.sample(256, g)
    truth = data.log_prob(x)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        default = flow.log_prob(x, generator=gen)
        tight = flow.log_prob(x, divergence="exact", atol=1e-9, rtol=1e-9)
        hutch = flow.log_prob(
            x, divergence="hutchinson", probes=4, generator=gen, atol=1e-9, rtol=1e-9
        )
        z = Gaussian(torch.zeros(d, dtype=DT), torch.eye(d, dtype=DT)).exact_sample(4096, g)
        samples = flow.decode(z, solver="rk4", steps=32)
    kind = "exact" if d <= 16 else "hutchinson"
    out = [
        Check("log_density", d, seed, "default_max_abs", float((default - truth).abs().max()),
              1e-3 * d if kind == "exact" else None, f"divergence={kind}; reported above 16-D"),
        Check("log_density", d, seed, "exact_max_abs", float((tight - truth).abs().max()), 1e-6 * d),
        z_check("log_density", d, seed, "hutchinson_bias", hutch - truth, 1e-6 * d),
    ]  # fmt: skip
    out += moment_checks("log_density", d, seed, samples, data, 1e-6, "sample_")
    return out


# ------------------------------------------------------------------------------------------------
# The finite-data rectified-flow velocity
# ------------------------------------------------------------------------------------------------


def case_rectified(d: int, seed: int, budget: str = "test") -> list[Check]:
    """The exact flow-matching velocity of a finite data set (:class:`ClosedFormVelocity`).

    * ``velocity``: it equals the papers' softmax formula (:func:`closed_forms.finite_data_velocity`).
    * ``stationarity``: flow matching's loss (:func:`iterflow.methods.fm.flow_matching_loss`, data
      drawn uniformly from the points, noise ``N(0, I)``) is stationary there in random directions.
    """
    g = generator(6, d, seed)
    points = random_gaussian(d, g).sample(12, g)
    v = ClosedFormVelocity(points, s_min=0.0)
    x = torch.randn(64, d, generator=g, dtype=DT) * 1.5
    s = torch.empty(64, dtype=DT).uniform_(0.02, 1.0, generator=g)
    out = [
        Check(
            "rectified",
            d,
            seed,
            "velocity",
            rel(v.exact(x, s), finite_data_velocity(points, x, s)),
            1e-10,
        )
    ]
    n = 2**16 if budget == "test" else 2**17

    def rows(module: nn.Module) -> Tensor:
        gen = generator(7, d, seed)
        idx = torch.randint(0, points.shape[0], (n,), generator=gen)
        x1 = torch.randn(n, d, generator=gen, dtype=DT)
        return flow_matching_loss(module, points[idx], x1, FMOptions(), gen).rows * d

    fields = [RandomField(d, g) for _ in range(3)]
    values = stationarity(rows, v, fields)
    out += [
        z_check("rectified", d, seed, f"stationarity_{k}", values[:, k]) for k in range(len(fields))
    ]
    return out


# ------------------------------------------------------------------------------------------------
# Optimal transport and worst-case maps: the exact parts (the fits are in closed_form_training)
# ------------------------------------------------------------------------------------------------


def case_ot_exact(d: int, seed: int, budget: str = "test") -> list[Check]:
    """The transport cost of the exact OT flow between ``P`` and ``Q``
    (:func:`iterflow.apps.ot.transport_cost` of :func:`iterflow.apps.ot.gaussian_ot_flow`) equals the
    Bures-Wasserstein ``W2^2`` and its end points are ``Q``'s moments."""
    p, q = ot_pair(d, seed)
    flow = gaussian_ot_flow(p.mean, p.cov, q.mean, q.cov, blocks=2)
    g = generator(9, d, seed)
    xp, xq = p.exact_sample(4096, g), q.exact_sample(4096, g)
    cost = transport_cost(flow, xp, xq, steps=8)
    w2 = gaussian_w2_sq(p.mean, p.cov, q.mean, q.cov)
    with torch.no_grad():
        pushed = flow.encode(xp, solver="rk4", steps=8)
    return [
        Check("ot_exact", d, seed, "w2_sq", abs(cost.w2_sq / w2 - 1), 1e-6, f"W2^2={w2:.3f}"),
        *moment_checks("ot_exact", d, seed, pushed, q, 1e-6, "pushed_"),
    ]


def case_worst_case_exact(d: int, seed: int, budget: str = "test") -> list[Check]:
    """Per-sample gradient ascent (:func:`iterflow.apps.dro.gradient_ascent`, the baseline) reaches
    the quadratic and linear risks' proximal points (their ``optimal_map``) to round-off."""
    p, quad, lin = worst_case_problem(d, seed)
    x = p.sample(256, generator(11, d, seed))
    out = []
    for name, risk in (("quadratic", quad), ("linear", lin)):
        ys = risk.optimal_map(x, 1.0)
        res = gradient_ascent(x, risk, gamma=1.0, steps=1000)
        out.append(
            Check("worst_case_exact", d, seed, f"{name}_ascent", map_error(res.points, ys, x), 1e-7)
        )
    return out


def map_error(y: Tensor, ys: Tensor, x: Tensor) -> float:
    """``sqrt(E|y - y*|^2 / E|y* - x|^2)``: a map's error relative to the exact displacement."""
    y = y.detach().double()
    return float((((y - ys) ** 2).sum(1).mean() / ((ys - x) ** 2).sum(1).mean()).sqrt())


CASES: dict[str, Callable[[int, int, str], list[Check]]] = {
    "jko": case_jko,
    "local_fm": case_local_fm,
    "log_density": case_log_density,
    "rectified": case_rectified,
    "ot_exact": case_ot_exact,
    "worst_case_exact": case_worst_case_exact,
}
