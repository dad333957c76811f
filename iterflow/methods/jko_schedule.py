"""JKO-flow's step-size schedules and per-block diagnostics (:mod:`iterflow.methods.jko`).

Schedules of ``gamma_n`` (``JKOOptions.gamma_schedule``):

* ``constant``: ``gamma_n = gamma``.
* ``geometric``: ``gamma_n = gamma * growth^(n-1)``.
* ``adaptive``: ``gamma_1 = gamma`` and, after block ``n`` moved the particles by
  ``m_n = sqrt(E|x_n - x_{n-1}|^2)`` (:func:`w2_movement`),

  .. math::
      \\gamma_{n+1} = \\gamma_n \\cdot \\operatorname{clip}(m_1 / m_n,\\ 1,\\ \\text{growth}),

  capped by ``gamma_max``. A JKO step of length ``gamma`` moves the particles by about ``gamma``
  times the speed ``|grad log(p_n / q)|`` of the Wasserstein gradient flow, and that speed falls as
  ``p_n`` nears ``q``; rescaling ``gamma`` by ``m_1 / m_n`` asks every block for the first block's
  movement. This is the idea of the adaptive time reparametrisation of JKO-iFlow (Xu, Cheng, Xie,
  arXiv 2212.14424, Sec. 4: time steps chosen so that the blocks cover equal W2 arc length of the
  trajectory), here as an online rule: it reads only the finished blocks' records (``gamma``,
  ``w2_movement`` in the run's history), so a resumed run continues the same sequence. The clip
  keeps the sequence non-decreasing and geometric at most, as the linear-convergence bound of the
  JKO scheme allows (Cheng, Lu, Tan, Xie, arXiv 2310.17582: per block the W2 distance to ``q``
  contracts by ``1 / (1 + gamma_n lambda)`` for ``lambda``-convex KL, so larger late steps converge
  faster while the proximal steps stay well posed).

Diagnostics (per block, on the validation particles):

* :func:`w2_movement`: ``sqrt(E|x_n - x_{n-1}|^2)`` with its delta-method standard error. It is the
  transport cost of the coupling the block's map defines, hence an upper bound of
  ``W2(p_{n-1}, p_n)``, with equality when the map is the optimal one (which the JKO step is).
* :func:`knn_kl_with_error`: the k-NN estimate of ``KL(p_n || N(0, I))`` from the particles alone
  (:func:`iterflow.metrics.kl_to_standard_normal`), with the standard error of batch means over
  disjoint groups: its sampling error, not the estimator's finite-sample bias.
* :func:`prefix_kl`: where the data's log density is known (the papers' 2-D densities), the
  unbiased estimate ``KL(p_n || N(0, I)) = E_{x ~ p}[log p(x) - log q_n(x)]`` of held-out points,
  ``q_n`` the exact density of the first ``n`` blocks' flow (change of variables; the KL is
  invariant under the invertible map of the blocks), with the standard error of the per-point mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from iterflow.core.flow import Flow, standard_normal_log_prob
from iterflow.core.integrand import integrate_chain
from iterflow.core.ode import SolverSpec

GAMMA_SCHEDULES = ("constant", "geometric", "adaptive")
KNN_GROUPS = 4  # disjoint groups of the batch-means standard error of the k-NN estimate


def gamma_sequence(
    gamma: float,
    schedule: str,
    growth: float,
    gamma_max: float,
    movements: Sequence[float] = (),
    n: int | None = None,
) -> list[float]:
    """The step sizes ``gamma_1..gamma_n`` of a schedule (see the module docstring).

    Arguments:
        gamma: ``gamma_1``.
        schedule: ``constant``, ``geometric`` or ``adaptive``.
        growth: geometric factor (``geometric``), largest factor between blocks (``adaptive``).
        gamma_max: cap of every ``gamma_n`` (0: none).
        movements: W2 movements ``m_1, m_2, ...`` of the finished blocks (``adaptive`` only).
        n: number of step sizes; by default ``len(movements) + 1`` (the next block's included).

    Returns:
        ``[gamma_1, ..., gamma_n]``.
    """
    n = len(movements) + 1 if n is None else n

    def cap(g: float) -> float:
        return min(g, gamma_max) if gamma_max > 0 else g

    if schedule == "constant":
        return [cap(gamma)] * n
    if schedule == "geometric":
        return [cap(gamma * growth**i) for i in range(n)]
    out = [cap(gamma)]
    for i in range(1, n):
        m_first, m_last = (movements[0], movements[i - 1]) if i - 1 < len(movements) else (1, 1)
        ratio = m_first / m_last if m_last > 0 else growth
        out.append(cap(out[-1] * min(max(ratio, 1.0), growth)))
    return out


def history_movements(history: Sequence[dict[str, Any]]) -> list[float]:
    """The W2 movements of the finished blocks of a run's ``history`` (``w2_movement``, else the
    square root of ``movement`` for records written before it existed)."""
    out = []
    for r in history:
        m = r.get("w2_movement")
        out.append(float(m) if m is not None else math.sqrt(max(float(r["movement"]), 0.0)))
    return out


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Sample mean of ``values`` ``(n,)`` and its standard error ``std / sqrt(n)``."""
    v = values.detach().double().flatten()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return float(v.mean()), se


def w2_movement(before: Tensor, after: Tensor) -> dict[str, float]:
    """``sqrt(E|x_n - x_{n-1}|^2)`` of the particles ``before`` -> ``after`` ``(B, *E)``, and its
    standard error by the delta method (``se(mean square) / (2 sqrt(mean square))``)."""
    sq = (after - before).detach().double().pow(2).flatten(1).sum(1)
    m2, se2 = mean_and_se(sq)
    m = math.sqrt(max(m2, 0.0))
    return {"w2_movement": m, "w2_movement_se": se2 / (2 * m) if m > 0 else float("nan")}


def knn_kl_with_error(x: Tensor, groups: int = KNN_GROUPS) -> tuple[float, float]:
    """k-NN estimate of ``KL(p || N(0, I))`` from samples ``x`` ``(n, d)`` and the batch-means
    standard error (estimates on ``groups`` disjoint groups; their standard deviation over
    ``sqrt(groups)``). The error is the sampling error only, not the estimator's bias."""
    from iterflow.metrics import kl_to_standard_normal

    xd = x.detach().double().cpu()
    est = kl_to_standard_normal(xd)
    parts = [kl_to_standard_normal(p) for p in xd.chunk(groups) if p.shape[0] > 10]
    se = float(torch.tensor(parts).std() / math.sqrt(len(parts))) if len(parts) > 1 else math.nan
    return est, se


@torch.no_grad()
def prefix_log_prob_rows(
    flow: Flow, x: Tensor, *, solver: SolverSpec | None = None, chunk: int = 4096
) -> list[Tensor]:
    """``log q_n(x)`` ``(n_points,)`` for ``n = 0..N``, ``q_n`` the density of the flow made of the
    first ``n`` blocks of ``flow`` (data units, its normalisation included), in one pass through
    the chain: ``log q_n(x) = log N(x_n) + sum_{j <= n} L_j(x) + log|normalisation|``, with the
    exact trace of each block's Jacobian (adaptive ``dopri5`` at tolerance 1e-5 when ``solver`` is
    ``None``)."""
    spec = solver or SolverSpec("dopri5", 16, 1e-5, 1e-5)
    rows: list[list[Tensor]] = [[] for _ in range(flow.num_blocks + 1)]
    flow = flow.to(device=x.device, dtype=x.dtype).eval()
    for part in x.split(chunk):
        u = flow.normalize(part)
        acc = flow.normalization_log_det().to(u.dtype).expand(u.shape[0]).clone()
        rows[0].append(standard_normal_log_prob(u) + acc)
        for n, block in enumerate(flow.chain, start=1):
            r = integrate_chain([block], u, spec, probes=None, create_graph=False, kinetic=False,
                                jacobian=False)  # fmt: skip
            u, acc = r.z, acc + r.div
            rows[n].append(standard_normal_log_prob(u) + acc)
    return [torch.cat(r) for r in rows]


def prefix_kl(
    flow: Flow,
    x: Tensor,
    log_p: Tensor,
    *,
    solver: SolverSpec | None = None,
    chunk: int = 4096,
) -> list[tuple[float, float]]:
    """``KL(p_n || N(0, I))`` for ``n = 0..N`` with standard errors, from held-out data points.

    With ``q_n`` the density of the flow made of the first ``n`` blocks
    (:func:`prefix_log_prob_rows`), ``KL(p_n || N(0, I)) = KL(p || q_n) = E_p[log p(x) - log
    q_n(x)]`` (the KL is invariant under the blocks' invertible map). The estimate is the mean of
    the per-point differences over ``x`` (unbiased) and its error the standard error of that mean.

    Arguments:
        flow: trained flow of ``N`` blocks (data units).
        x: ``(n, *E)`` held-out points of ``p``.
        log_p: ``(n,)`` their exact log density under ``p``.
        solver: solver of the blocks (adaptive ``dopri5`` at tolerance 1e-5 when ``None``).
        chunk: points per call.

    Returns:
        ``[(kl_0, se_0), ..., (kl_N, se_N)]``; ``kl_0`` is ``KL`` of the normalised data.
    """
    rows = prefix_log_prob_rows(flow, x, solver=solver, chunk=chunk)
    return [mean_and_se(log_p.to(x) - lq) for lq in rows]
