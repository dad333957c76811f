"""Evaluation of a trained flow: the figures ``iterflow eval --json`` prints."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import Registry, check_positive, fail
from iterflow.evaluation.quality import euler_samples, eval_straightness
from iterflow.evaluation.score import log_density_rows

W2_NFES = (1, 2, 4, 8, 32)
#: Neighbour order of precision, recall, density and coverage (5, as in both papers).
PRDC_K = 5

# Extra figures added to every evaluation: name -> fn(flow, test_x, seed) -> dict merged into the JSON.
# Features register here (e.g. straightness and transport cost), so ``eval --json`` grows by keys.
EVAL_EXTRAS: Registry[Callable[[Flow, Tensor, int], dict[str, Any]]] = Registry(
    "eval extra", {"straightness": eval_straightness}
)


def nll(
    flow: Flow,
    x: Tensor,
    *,
    spec: SolverSpec,
    divergence: str = "auto",
    probes: int = 1,
    seed: int = 0,
    chunk: int = 4096,
) -> tuple[float, float, int]:
    """Mean negative log-likelihood in nats per sample, its standard error, and the NFE used."""
    v, nfe = nll_per_sample(
        flow, x, spec=spec, divergence=divergence, probes=probes, seed=seed, chunk=chunk
    )
    if not bool(torch.isfinite(v).all()):
        return math.inf, math.nan, nfe
    return float(v.mean()), float(v.std() / math.sqrt(len(v))), nfe


def nll_per_sample(
    flow: Flow,
    x: Tensor,
    *,
    spec: SolverSpec,
    divergence: str = "auto",
    probes: int = 1,
    seed: int = 0,
    chunk: int = 4096,
) -> tuple[Tensor, int]:
    """``-log p(x_i)`` in nats (float64, on ``x``'s device) in chunks of ``chunk`` rows, with one
    probe generator seeded by ``seed``; and the number of velocity evaluations it took (the loop
    of :func:`iterflow.evaluation.score.log_density_rows`)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lp, nfe = log_density_rows(
        flow, x, spec=spec, divergence=divergence, probes=probes, generator=gen, chunk=chunk
    )
    return -lp, nfe


def euler_steps_per_block(nfes: tuple[int, ...], blocks: int) -> list[int]:
    """Euler steps per block at which :func:`evaluate` compares samples, for total budgets ``nfes``.

    One block: the budgets themselves. A chain of ``B`` blocks spends ``B`` evaluations per step
    (one per block), so budget ``n`` becomes ``max(1, n // B)`` steps per block, and 1, 2, 4 and
    8 steps per block are always added, so that a chain's curve keeps several points (five blocks:
    ``(1, 2, 4, 8, 32)`` -> 1, 2, 4, 6, 8 steps, i.e. NFE 5, 10, 20, 30, 40).

    Example:
        >>> euler_steps_per_block((1, 2, 4, 8, 32), 1), euler_steps_per_block((1, 2, 4, 8, 32), 5)
        ([1, 2, 4, 8, 32], [1, 2, 4, 6, 8])
    """
    if blocks <= 1:
        return sorted({max(1, int(n)) for n in nfes})
    return sorted({max(1, n // blocks) for n in nfes} | {1, 2, 4, 8})


def evaluate(
    flow: Flow,
    test: Tensor,
    *,
    entropy: float | None = None,
    n: int = 2000,
    seed: int = 0,
    solver: str = "dopri5",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    divergence: str = "auto",
    probes: int = 1,
    nfes: tuple[int, ...] = W2_NFES,
) -> dict[str, Any]:
    """Likelihood and sample-quality figures of ``flow`` on held-out data.

    Arguments:
        flow: trained flow (data units).
        test: ``(m, *E)`` held-out data; the first ``n`` rows are used.
        entropy: the data's differential entropy when known (the floor of the expected NLL).
        n: number of test points and of model samples.
        seed: seeds sampling and Hutchinson probes.
        solver, steps, atol, rtol: integration for the NLL and the reference samples.
        divergence, probes: exact trace or Hutchinson (see :meth:`Flow.log_prob`).
        nfes: total function-evaluation budgets at which Euler samples are compared (W2); for a
            chain they become steps per block by :func:`euler_steps_per_block`.

    Returns:
        A JSON-serialisable dict with ``nll``, ``nll_stderr``, ``entropy``, ``nll_gap``, ``bits_per_dim``,
        ``w2``, ``mmd``, ``w2_by_nfe``, ``nfe``, ``inversion_error``, ``precision``, ``recall``,
        ``density``, ``coverage`` (model samples against the test points, ``k = prdc_k``
        neighbours, in the flow's standardised units; ``None`` with ``k`` or fewer points; see
        :func:`~iterflow.metrics.precision_recall_density_coverage`) and timings.
    """
    from iterflow.metrics import PRDC_KEYS, mmd, precision_recall_density_coverage, w2

    check_positive(n, "n", integer=True)
    if test.shape[0] == 0:
        fail("test", "must provide at least one test point", 0)
    x = test[:n].to(device=flow.shift.device, dtype=flow.shift.dtype)
    spec = SolverSpec(solver, steps, atol, rtol)
    out: dict[str, Any] = {
        "n": int(x.shape[0]),
        "dim": flow.dim,
        "blocks": flow.num_blocks,
        "solver": solver,
    }
    t0 = time.perf_counter()
    out["nll"], out["nll_stderr"], out["nfe_nll"] = nll(
        flow, x, spec=spec, divergence=divergence, probes=probes, seed=seed
    )
    out["seconds_nll"] = time.perf_counter() - t0
    out["entropy"] = entropy
    out["nll_gap"] = out["nll"] - entropy if entropy is not None else None
    out["bits_per_dim"] = out["nll"] / (flow.dim * math.log(2))
    t0 = time.perf_counter()
    gen = torch.Generator(device=flow.shift.device).manual_seed(seed + 1)
    with flow.count_nfe() as c, torch.no_grad():
        samples = flow.sample(x.shape[0], generator=gen, solver=spec)
        back = flow.decode(flow.encode(x[: min(500, len(x))], solver=spec), solver=spec)
    out["nfe_sample"] = c.nfe
    out["seconds_sample"] = time.perf_counter() - t0
    out["inversion_error"] = float((back - x[: len(back)]).flatten(1).norm(dim=1).max())
    xf, sf = x.flatten(1).cpu(), samples.flatten(1).cpu()
    out["w2"] = w2(sf, xf, seed=seed)
    out["mmd"] = mmd(sf, xf)
    t0 = time.perf_counter()
    with torch.no_grad():  # k-NN balls in the run's standardised units (scale-free features)
        xn, sn = flow.normalize(x).flatten(1).cpu(), flow.normalize(samples).flatten(1).cpu()
    if xn.shape[0] > PRDC_K:
        out.update(precision_recall_density_coverage(xn, sn, k=PRDC_K, seed=seed))
    else:
        out.update(dict.fromkeys(PRDC_KEYS))
    out["prdc_k"] = PRDC_K
    out["seconds_prdc"] = time.perf_counter() - t0
    by_nfe = {}
    for k in euler_steps_per_block(tuple(nfes), flow.num_blocks):
        s_k, used = euler_samples(flow, x.shape[0], k, seed + 2)
        by_nfe[str(used)] = w2(s_k.flatten(1).cpu(), xf, seed=seed)
    out["w2_by_nfe"] = by_nfe
    for name in EVAL_EXTRAS:
        t0 = time.perf_counter()
        out.update(EVAL_EXTRAS[name](flow, x, seed))
        out[f"seconds_{name}"] = time.perf_counter() - t0
    return out
