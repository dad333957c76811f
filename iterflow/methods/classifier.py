"""Classification objectives, per row, for the one loop: the risk classifier of the worst-case
sampler, the density-ratio classifiers of the telescopic estimator and flow OT, and the image feature
classifier all train on these.

- :func:`cross_entropy_loss`: ``-log softmax(f(x))_y`` (with optional label smoothing).
- :func:`logistic_loss`: the two-sample logistic loss
  ``log(1 + e^{phi(x0)}) + log(1 + e^{-phi(x1)})``, minimised by ``phi* = log(f1 / f0)`` (the
  tutorial's Lemma V.1; METHODS.md section 5), one row per pair ``(x0_i, x1_i)``.

Both compute only this process's rows of the global batch
(:func:`iterflow.core.distributed.local_rows`) and return per-row values
(:class:`~iterflow.methods.base.Loss`) that the loop reduces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from iterflow.core.distributed import local_rows
from iterflow.errors import fail
from iterflow.methods.base import Loss


def cross_entropy_loss(
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float = 0.0,
) -> Loss:
    """Per-row cross-entropy of ``logits_fn(x)`` ``(b, K)`` against integer ``labels`` ``(b,)``.

    Example:
        >>> import torch
        >>> loss = cross_entropy_loss(lambda x: x, torch.zeros(3, 4), torch.tensor([0, 1, 2]))
        >>> round(float(loss.value()), 4)  # log 4: uniform logits over four classes
        1.3863
    """
    if labels.shape != x.shape[:1]:
        fail(
            "labels",
            f"must have one entry per row of x, shape {tuple(x.shape[:1])}",
            tuple(labels.shape),
        )
    n = x.shape[0]
    rows = local_rows(n)
    ce = F.cross_entropy(logits_fn(x[rows]), labels[rows], reduction="none",
                         label_smoothing=label_smoothing)  # fmt: skip
    return Loss(ce, n, {"cross_entropy": ce.detach()})


def logistic_loss(logit_fn: Callable[[Tensor], Tensor], x0: Tensor, x1: Tensor) -> Loss:
    """Per-pair logistic loss ``softplus(phi(x0_i)) + softplus(-phi(x1_i))`` for ``phi = logit_fn``.

    ``x0`` ``(b, ...)`` come from ``f0`` and ``x1`` ``(b, ...)`` from ``f1``; at the optimum
    ``phi(x) = log f1(x) / f0(x)``.

    Example:
        >>> import torch
        >>> loss = logistic_loss(lambda x: x.sum(1) * 0, torch.zeros(5, 2), torch.ones(5, 2))
        >>> round(float(loss.value()), 4)  # 2 log 2 at phi = 0
        1.3863
    """
    if x0.shape[0] != x1.shape[0]:
        fail("x1", f"must have as many rows as x0 ({x0.shape[0]})", x1.shape[0])
    n = x0.shape[0]
    rows = local_rows(n)
    phi = logit_fn(torch.cat([x0[rows], x1[rows]]))
    b = phi.shape[0] // 2
    per_row = F.softplus(phi[:b]) + F.softplus(-phi[b:])
    return Loss(per_row, n, {"logistic": per_row.detach()})
