"""Sample quality against the number of function evaluations, straightness and memorisation
(the figures of rectified flow and distillation, :mod:`iterflow.core.rectified`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.rectified import quick_straightness
from iterflow.errors import check_positive


@torch.no_grad()
def samples_at_nfe(flow: Flow, n: int, nfe: int, seed: int) -> tuple[Tensor, int]:
    """Euler samples using about ``nfe`` evaluations in total (at least one step per block)."""
    return euler_samples(flow, n, max(1, nfe // max(1, flow.num_blocks)), seed)


@torch.no_grad()
def euler_samples(flow: Flow, n: int, steps: int, seed: int) -> tuple[Tensor, int]:
    """``n`` samples by ``steps`` Euler steps per block; returns them and the evaluations used."""
    gen = torch.Generator(device=flow.shift.device).manual_seed(seed)
    with flow.count_nfe() as c:
        x = flow.sample(n, generator=gen, solver="euler", steps=steps)
    return x, c.nfe


def eval_straightness(flow: Flow, test_x: Tensor, seed: int) -> dict[str, Any]:
    """``iterflow eval`` extra: straightness and transport cost at the cheap budget."""
    res = quick_straightness(flow, seed + 17)
    return {"straightness": res.straightness, "transport_cost": res.transport_cost}


# ----------------------------------------------------------------------------------------------
# Sample quality against NFE, memorisation
# ----------------------------------------------------------------------------------------------


def w2_by_nfe(
    flow: Flow, reference: Tensor, nfes: tuple[int, ...] = (1, 2, 4, 8, 32), *, seed: int = 0
) -> dict[int, float]:
    """W2 between Euler samples of ``flow`` and ``reference`` at each function-evaluation budget.

    Arguments:
        flow: any flow (``nfe // num_blocks`` Euler steps per block).
        reference: ``(m, *E)`` held-out data (data units); ``m`` samples are drawn.
        nfes: total evaluation budgets.
        seed: seeds the samples and the W2 subsampling.

    Returns:
        ``{nfe actually used: W2}``.
    """
    from iterflow.metrics import w2

    ref = reference.flatten(1).cpu()
    out = {}
    for k in nfes:
        check_positive(k, "nfes", integer=True)
        x, used = samples_at_nfe(flow, reference.shape[0], k, seed)
        out[used] = w2(x.flatten(1).cpu(), ref, seed=seed)
    return out


@dataclass(frozen=True)
class Memorization:
    """Nearest-training-point distances (data units) of a model's samples and of held-out data.

    A model that memorises puts its samples (near) on training points: ``samples_median`` far below
    ``heldout_median``, the typical distance of fresh data to the training set.
    """

    samples_mean: float
    samples_median: float
    heldout_mean: float
    heldout_median: float


@torch.no_grad()
def memorization(
    flow: Flow,
    train: Tensor,
    heldout: Tensor,
    *,
    n: int = 1000,
    generator: torch.Generator | None = None,
    solver: str = "euler",
    steps: int = 128,
) -> Memorization:
    """Compare nearest-training-point distances of ``n`` samples with those of held-out data.

    Arguments:
        flow: the model.
        train: ``(N, *E)`` training points (data units).
        heldout: ``(m, *E)`` fresh data from the same distribution (the first ``n`` rows are used).
        n: number of samples.
        generator: randomness of the samples.
        solver, steps: how the samples are drawn (the closed-form flow needs many steps; see
            :func:`closed_form_flow`).
    """
    from iterflow.metrics import nearest_neighbor_distance

    samples = flow.sample(n, generator=generator, solver=solver, steps=steps)
    ref = train.to(samples)
    d_s = nearest_neighbor_distance(samples, ref).double()
    d_h = nearest_neighbor_distance(heldout[:n].to(samples), ref).double()
    return Memorization(
        float(d_s.mean()), float(d_s.median()), float(d_h.mean()), float(d_h.median())
    )
