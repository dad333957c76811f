"""Couplings: how the two ends ``(x0, x1)`` of a flow-matching pair are drawn together.

* ``independent``: ``x0`` and ``x1`` paired as given.
* ``ot``: within the minibatch, re-pair to minimise ``sum_i |x0_i - x1_pi(i)|^2`` exactly (an
  assignment problem; Pooladian et al. 2023, Tong et al. 2023). Solved by POT's network simplex
  (``ot.emd``) or by scipy's Jonker-Volgenant solver on float64 costs, optionally on independent
  chunks of the batch (``chunk``), which keeps the cost linear in the batch size.
* ``sinkhorn``: entropic OT plan, then one partner sampled per row (cheaper, approximate).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import Registry, check_positive, fail

COUPLINGS: Registry[str] = Registry("coupling")
for _n in ("independent", "ot", "sinkhorn"):
    COUPLINGS.register(_n, _n)


def _cost(x0: Tensor, x1: Tensor) -> np.ndarray:
    a = x0.reshape(x0.shape[0], -1).double()
    b = x1.reshape(x1.shape[0], -1).double()
    return torch.cdist(a, b).pow_(2).cpu().numpy()


def assignment(x0: Tensor, x1: Tensor, solver: str = "emd") -> Tensor:
    """Permutation ``pi`` (``(B,)`` long) minimising ``sum_i |x0_i - x1_{pi(i)}|^2`` exactly."""
    if x0.shape[0] != x1.shape[0]:
        fail("x1", f"must have as many rows as x0 ({x0.shape[0]}) for an assignment", x1.shape[0])
    cost = _cost(x0, x1)
    if solver == "emd":
        import ot

        n = cost.shape[0]
        w = np.full(n, 1.0 / n)
        plan = ot.emd(w, w, cost, numItermax=10_000_000)
        perm = plan.argmax(axis=1)
    elif solver == "lsa":
        from scipy.optimize import linear_sum_assignment

        perm = linear_sum_assignment(cost)[1]
    else:
        fail("ot_solver", "must be 'emd' or 'lsa'", solver)
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def sinkhorn_pairing(
    x0: Tensor, x1: Tensor, reg: float, generator: torch.Generator | None
) -> Tensor:
    """For each row of ``x0`` sample a partner from an entropic OT plan (``reg``: relative to mean cost)."""
    import ot

    cost = _cost(x0, x1)
    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    plan = ot.sinkhorn(w, w, cost / cost.mean(), reg, numItermax=500, warn=False)
    p = torch.as_tensor(plan, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    idx = torch.multinomial(p, 1, generator=generator).squeeze(1)
    return idx.to(x0.device)


def couple(
    x0: Tensor,
    x1: Tensor,
    kind: str = "independent",
    *,
    chunk: int = 0,
    ot_solver: str = "emd",
    reg: float = 0.05,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Pair ``x0`` with a re-ordering of ``x1`` according to the coupling ``kind``.

    Arguments:
        x0, x1: ``(B, *E)`` samples of the two ends.
        kind: ``"independent"``, ``"ot"`` or ``"sinkhorn"``.
        chunk: if > 0, solve the OT problem separately on consecutive chunks of this many rows.
        ot_solver: ``"emd"`` (POT) or ``"lsa"`` (scipy) for exact OT.
        reg: entropic regularisation of ``"sinkhorn"``, relative to the mean squared distance.
        generator: randomness of ``"sinkhorn"``.

    Returns:
        ``(x0, x1_paired)``.
    """
    COUPLINGS.get(kind, "coupling")
    if kind == "independent":
        return x0, x1
    check_positive(chunk, "ot_chunk", integer=True, allow_zero=True)
    n = x0.shape[0]
    size = chunk if 0 < chunk < n else n
    parts = []
    for start in range(0, n, size):
        a, b = x0[start : start + size], x1[start : start + size]
        if kind == "ot":
            perm = assignment(a, b, ot_solver)
        else:
            perm = sinkhorn_pairing(a, b, reg, generator)
        parts.append(b[perm])
    return x0, torch.cat(parts, 0)
