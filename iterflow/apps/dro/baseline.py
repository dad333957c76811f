"""The classical baseline of the worst-case sampler: per-sample gradient ascent on
``R(x') - |x - x'|^2 / (2 gamma)`` (the Lagrangian adversarial step of WRM; Sinha, Namkoong & Duchi
2018, arXiv 1710.10571), its calibration to a given transport cost, and the transfer of its steps to
new samples.

The ascent is a hand-written iteration on the points themselves (no network, no optimiser): it is
not a training loop and does not run on :func:`iterflow.train.loop.optimize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.apps.dro.data import check_labels, check_points
from iterflow.apps.dro.risks import ClassifierLoss, Risk, risk_values
from iterflow.errors import check_positive, fail


@dataclass(frozen=True)
class AscentResult:
    """Per-sample worst case by gradient ascent.

    Attributes:
        points: ``(n, d)`` final points ``x'``; gamma, steps: the settings used.
        step_size: the fixed step ``eta``, or the initial per-sample step when ``adaptive``.
        adaptive: whether steps were controlled per sample (see :func:`gradient_ascent`).
        gradient_evaluations: risk gradients computed per sample (the re-optimisation cost of every
            new sample).
    """

    points: Tensor
    gamma: float
    steps: int
    step_size: float
    adaptive: bool
    gradient_evaluations: int

    def displacement(self, x: Tensor) -> Tensor:
        """``x' - x``, shape ``(n, d)``."""
        return self.points - x


def _lagrangian(
    risk: Risk | ClassifierLoss, z: Tensor, x0: Tensor, labels: Tensor | None, gamma: float
) -> tuple[Tensor, Tensor]:
    """``J(z) = R(z) - |z - x0|^2 / (2 gamma)`` per sample ``(n,)`` and its gradient ``(n, d)``."""
    with torch.enable_grad():
        zr = z.detach().requires_grad_(True)
        r = risk_values(risk, zr, labels)
        g = torch.autograd.grad(r.sum(), zr)[0]
    diff = z.detach() - x0
    return r.detach() - (diff**2).sum(1) / (2 * gamma), g - diff / gamma


def gradient_ascent(
    x: Tensor,
    risk: Risk | ClassifierLoss,
    *,
    gamma: float,
    labels: Tensor | None = None,
    steps: int = 100,
    step_size: float | None = None,
) -> AscentResult:
    """Per-sample gradient ascent on ``J(x') = R(x') - |x - x'|^2 / (2 gamma)``, started at ``x' = x``.

    ``x' <- x' + eta (grad R(x') - (x' - x) / gamma)``: the Lagrangian adversarial step of WRM (Sinha,
    Namkoong & Duchi 2018, arXiv 1710.10571).

    * ``step_size`` given: that fixed ``eta`` for every sample (the classical iteration; with
      ``eta = gamma / 5`` it converges to the proximal point when ``gamma * Lip(grad R) < 9``, and may
      oscillate otherwise).
    * ``step_size=None`` (default): the same ascent direction with a per-sample step control, so
      that a sharp risk cannot make it oscillate: each sample starts at ``eta = gamma / 5``; a step is
      taken only if it does not decrease that sample's ``J`` (then ``eta`` grows by 1.25), otherwise it
      is refused and ``eta`` halves. ``J`` never decreases. One risk gradient per step.

    Arguments:
        x: ``(n, d)`` points; risk, labels: as in :func:`fit_worst_case`.
        gamma: Lagrange parameter; steps: ascent steps; step_size: fixed ``eta`` or ``None``.
    """
    check_points(x, "x")
    check_positive(gamma, "gamma")
    check_positive(steps, "steps", integer=True)
    if step_size is not None:
        check_positive(step_size, "step_size")
    if labels is not None:
        check_labels(x, labels)
    x0 = x.detach()
    z = x0.clone()
    if step_size is not None:
        for _ in range(steps):
            z = z + step_size * _lagrangian(risk, z, x0, labels, gamma)[1]
        return AscentResult(z, float(gamma), int(steps), float(step_size), False, int(steps))
    j, g = _lagrangian(risk, z, x0, labels, gamma)
    eta = torch.full((x.shape[0], 1), gamma / 5, dtype=x.dtype, device=x.device)
    for _ in range(steps):
        cand = z + eta * g
        jc, gc = _lagrangian(risk, cand, x0, labels, gamma)
        ok = (jc >= j)[:, None]
        z, g = torch.where(ok, cand, z), torch.where(ok, gc, g)
        j = torch.where(ok[:, 0], jc, j)
        eta = torch.where(ok, eta * 1.25, eta * 0.5)
    return AscentResult(z, float(gamma), int(steps), float(gamma / 5), True, int(steps) + 1)


def calibrate_ascent(
    x: Tensor,
    risk: Risk | ClassifierLoss,
    target_cost: float,
    *,
    labels: Tensor | None = None,
    steps: int = 100,
    gamma0: float = 1.0,
    rtol: float = 1e-3,
    max_iter: int = 40,
) -> AscentResult:
    """Gradient ascent whose transport cost ``E|x - x'|^2`` matches ``target_cost``.

    Bisects ``log gamma`` (the converged per-sample cost is non-decreasing in ``gamma``) after
    doubling/halving from ``gamma0`` to bracket the target (adaptive steps, see :func:`gradient_ascent`).

    Returns:
        The :class:`AscentResult` whose cost is closest to ``target_cost`` (relative error ``<= rtol``
        unless ``max_iter`` runs out or the risk cannot reach the cost).
    """
    check_positive(target_cost, "target_cost")
    check_positive(gamma0, "gamma0")

    def run(g: float) -> tuple[AscentResult, float]:
        res = gradient_ascent(x, risk, gamma=g, labels=labels, steps=steps)
        return res, float(((res.points - x) ** 2).sum(1).mean())

    best, best_cost = run(gamma0)
    lo, hi = (gamma0, None) if best_cost < target_cost else (None, gamma0)
    for _ in range(max_iter):
        if abs(best_cost - target_cost) <= rtol * target_cost:
            break
        if lo is not None and hi is not None:
            g = math.sqrt(lo * hi)
        else:
            g = (lo * 2.0) if lo is not None else (hi / 2.0)  # type: ignore[operator]
        res, cost = run(g)
        if abs(cost - target_cost) < abs(best_cost - target_cost):
            best, best_cost = res, cost
        if cost < target_cost:
            lo = g
        else:
            hi = g
    return best


def _nearest_index(a: Tensor, b: Tensor, chunk: int = 2048) -> Tensor:
    """Index into ``b`` of the nearest row (Euclidean) for every row of ``a``, shape ``(len(a),)``."""
    out = []
    for i in range(0, a.shape[0], chunk):
        out.append(torch.cdist(a[i : i + chunk], b).argmin(1))
    return torch.cat(out)


def transfer_displacement(train_x: Tensor, train_points: Tensor, new_x: Tensor) -> Tensor:
    """Re-use per-sample worst-case steps on new points: ``x_new + (x'_j - x_j)``, ``j`` = nearest
    training point of ``x_new``.

    This is the cheapest way to apply a per-sample attack to samples it was not computed on (the
    alternative, re-optimising every new sample, costs ``steps`` risk gradients per sample).

    Returns:
        ``(m, d)`` transferred points.
    """
    check_points(train_x, "train_x")
    check_points(new_x, "new_x")
    if train_points.shape != train_x.shape:
        fail(
            "train_points",
            f"must have the shape of train_x {tuple(train_x.shape)}",
            tuple(train_points.shape),
        )
    j = _nearest_index(new_x, train_x)
    return new_x + (train_points - train_x)[j]
