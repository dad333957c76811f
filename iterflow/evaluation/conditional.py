"""Conditional likelihoods of a label-conditional flow and its generative classifier.

A flow trained with class labels (``num_classes = K``) is a family of densities ``p(x | y)``, one
per class, each computed by the instantaneous change of variables along the flow of
``v(., . | y)`` (:meth:`~iterflow.core.flow.Flow.log_prob` under
:func:`~iterflow.core.conditioning.conditioning`). With a class prior ``p(y)`` (the training
frequencies) Bayes' rule turns them into a classifier and a marginal density:

.. math::
    \\hat y(x) = \\arg\\max_y\\ \\log p(x \\mid y) + \\log p(y), \\qquad
    \\log p(x) = \\operatorname{logsumexp}_y \\big[\\log p(x \\mid y) + \\log p(y)\\big].

The *generative classifier* needs no classifier training; its test accuracy measures how well the
class-conditional densities separate the classes (the Bayes-optimal accuracy when they are exact).
With Hutchinson's trace estimator every class sees the same probes for a row (common random
numbers), so the comparison between classes is not blurred by independent probe noise.

References:
    Chen et al., "Neural Ordinary Differential Equations", arXiv 1806.07366; Grathwohl et al.,
    FFJORD, arXiv 1810.01367 (likelihoods); Ng & Jordan, "On Discriminative vs. Generative
    Classifiers", NIPS 2001.

Example:
    >>> import torch
    >>> from iterflow.core.flow import Block, Flow
    >>> from iterflow.core.nn import MLPVelocity
    >>> flow = Flow([Block(MLPVelocity(2, hidden=(8,), num_classes=3))], (2,))
    >>> ll = class_log_likelihoods(flow, torch.zeros(4, 2), solver="rk4", steps=2)
    >>> ll.shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.guidance import LABEL_KEY
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_positive, fail
from iterflow.evaluation.score import log_density_rows

__all__ = [
    "GenerativeClassifier",
    "class_log_likelihoods",
    "conditional_log_prob",
    "conditional_metrics",
    "generative_classifier",
    "log_prior",
]


def _classes(flow: Flow) -> int:
    k = flow.num_classes
    if k < 1:
        fail("flow", "must be label-conditional (trained with class labels)", "no classes")
    return k


def _spec(solver: str | SolverSpec, steps: int, atol: float, rtol: float) -> SolverSpec:
    return solver if isinstance(solver, SolverSpec) else SolverSpec(solver, steps, atol, rtol)


def conditional_log_prob(
    flow: Flow,
    x: Tensor,
    labels: Tensor | int,
    *,
    divergence: str = "auto",
    probes: int = 1,
    seed: int = 0,
    chunk: int = 4096,
    solver: str | SolverSpec = "dopri5",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Tensor:
    """``log p(x_i | y_i)`` in nats, ``(n,)`` float64, ``chunk`` rows at a time, without a graph.

    Arguments:
        flow: a label-conditional flow (data units).
        x: ``(n, *E)`` rows on the flow's device.
        labels: ``(n,)`` classes in ``[0, K)``, or one class for every row.
        divergence, probes: the trace estimator (:meth:`Flow.log_prob`); the probes come from a
            generator seeded with ``seed`` and restarted for every call, so two calls with the
            same rows and chunks use the same probes whatever the labels.
        chunk: largest batch handed to the solver.
        solver, steps, atol, rtol: integration.
    """
    k = _classes(flow)
    check_positive(chunk, "chunk", integer=True)
    y = torch.as_tensor(labels, device=x.device)
    y = y.expand(x.shape[0]) if y.ndim == 0 else y
    if y.shape != (x.shape[0],) or y.is_floating_point() or y.dtype == torch.bool:
        fail("labels", f"must be one class or {x.shape[0]} integer classes", tuple(y.shape))
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        fail("labels", f"must lie in [0, {k})", (int(y.min()), int(y.max())))
    spec = _spec(solver, steps, atol, rtol)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    lp, _ = log_density_rows(flow, x, spec=spec, divergence=divergence, probes=probes,
                             generator=gen, chunk=chunk, cond={LABEL_KEY: y.long()})  # fmt: skip
    return lp


def class_log_likelihoods(flow: Flow, x: Tensor, **kwargs: Any) -> Tensor:
    """``log p(x_i | y = c)`` for every row and class: ``(n, K)`` float64.

    Arguments:
        flow: a label-conditional flow with ``K`` classes.
        x: ``(n, *E)`` rows on the flow's device.
        **kwargs: as in :func:`conditional_log_prob` (the same probes for every class).
    """
    k = _classes(flow)
    cols = [conditional_log_prob(flow, x, c, **kwargs) for c in range(k)]
    return torch.stack(cols, dim=1)


def log_prior(counts: Any, num_classes: int) -> Tensor:
    """``log p(y)`` ``(K,)`` from class counts or probabilities (``None``: uniform)."""
    if counts is None:
        return torch.full((num_classes,), -math.log(num_classes), dtype=torch.float64)
    c = torch.as_tensor(counts, dtype=torch.float64)
    if c.shape != (num_classes,) or bool((c < 0).any()) or float(c.sum()) <= 0:
        fail("prior", f"must be {num_classes} non-negative counts with a positive sum", c.tolist())
    return (c / c.sum()).log()


@dataclass(frozen=True)
class GenerativeClassifier:
    """What :func:`generative_classifier` returns.

    Attributes:
        log_likelihoods: ``(n, K)`` ``log p(x_i | y = c)``.
        log_prior: ``(K,)`` ``log p(y)``.
        log_posterior: ``(n, K)`` ``log p(y = c | x_i)`` (Bayes' rule).
        predictions: ``(n,)`` ``argmax_c log p(x_i | c) + log p(c)``.
        log_marginal: ``(n,)`` ``log p(x_i) = logsumexp_c [log p(x_i | c) + log p(c)]``.
        accuracy: fraction of rows whose prediction equals their label (``None`` without labels).
    """

    log_likelihoods: Tensor
    log_prior: Tensor
    log_posterior: Tensor
    predictions: Tensor
    log_marginal: Tensor
    accuracy: float | None


def generative_classifier(
    flow: Flow,
    x: Tensor,
    labels: Tensor | None = None,
    *,
    prior: Any = None,
    **kwargs: Any,
) -> GenerativeClassifier:
    """Classify rows by Bayes' rule on the flow's class-conditional densities (module docstring).

    Arguments:
        flow: a label-conditional flow with ``K`` classes.
        x: ``(n, *E)`` rows on the flow's device.
        labels: ``(n,)`` true classes, for the accuracy (optional).
        prior: class counts or probabilities ``(K,)`` (a run's ``labels.class_counts``);
            ``None``: uniform.
        **kwargs: integration and trace settings of :func:`conditional_log_prob`.
    """
    ll = class_log_likelihoods(flow, x, **kwargs).cpu()
    lp = log_prior(prior, ll.shape[1])
    joint = ll + lp
    marginal = torch.logsumexp(joint, dim=1)
    pred = joint.argmax(dim=1)
    acc = None
    if labels is not None:
        y = torch.as_tensor(labels).cpu().long()
        if y.shape != pred.shape:
            fail("labels", f"must hold one class per row ({pred.shape[0]})", tuple(y.shape))
        acc = float((pred == y).double().mean())
    return GenerativeClassifier(ll, lp, joint - marginal[:, None], pred, marginal, acc)


def conditional_metrics(
    flow: Flow, x: Tensor, labels: Tensor, *, prior: Any = None, **kwargs: Any
) -> dict[str, Any]:
    """The conditional figures of ``iterflow eval --json`` on held-out rows and their labels.

    Returns:
        ``cond_nll`` (mean ``-log p(x | y)``, nats) and ``cond_nll_stderr``; ``marginal_nll``
        (mean ``-log sum_y p(x | y) p(y)``); ``gen_classifier_accuracy``; ``num_classes``;
        ``cond_n`` (rows used).
    """
    res = generative_classifier(flow, x, labels, prior=prior, **kwargs)
    y = torch.as_tensor(labels).cpu().long()
    nll = -res.log_likelihoods.gather(1, y[:, None])[:, 0]
    n = int(nll.numel())
    finite = bool(torch.isfinite(nll).all())
    return {
        "cond_nll": float(nll.mean()) if finite else math.inf,
        "cond_nll_stderr": float(nll.std() / math.sqrt(n)) if finite and n > 1 else None,
        "marginal_nll": float(-res.log_marginal.mean()),
        "gen_classifier_accuracy": res.accuracy,
        "num_classes": int(res.log_prior.numel()),
        "cond_n": n,
    }
