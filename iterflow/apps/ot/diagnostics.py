r"""How well a transport flow meets its end-point constraints, and a density-ratio estimate its
normalisation, measured on held-out rows without any closed form.

**Transport** (:func:`endpoint_diagnostics`). A flow ``T`` from ``P`` to ``Q`` should satisfy
``T_# P = Q`` and ``T^{-1}_# Q = P``, the two constraints the relaxed objective only penalises
(``gamma KL``; :mod:`iterflow.methods.transport`). Each is checked two ways:

- *classifier-estimated KL*: a fresh logistic classifier ``phi ~ log Q / T_# P`` is trained on the
  *training* rows (``T(x)``, label 0, against ``y``, label 1; :func:`~iterflow.apps.ot.baselines.
  fit_classifier`), and ``KL(T_# P || Q) = E_{T_# P} log(T_# P / Q) ~ -mean phi(T(x'))`` over the
  *held-out* source rows ``x'`` (the logistic loss is minimised by the log ratio: the tutorial's
  Lemma V.1); ``KL(T^{-1}_# Q || P)`` likewise with the pulled-back target rows. Being a difference
  of noisy estimates it can come out slightly negative for a near-perfect map.
- the unbiased squared *MMD* (Gaussian kernels, median-heuristic bandwidths;
  :func:`iterflow.metrics.mmd`) of the pushed held-out source to the held-out target and of the
  pulled-back target to the source, next to the MMD of the source to the target themselves (the
  scale of "no transport at all").

A good map has both KLs near 0 (a few hundredths of a nat) and MMDs far below the untransported
one; an untrained flow (the identity) shows ``KL(P || Q)`` itself.

**Density ratios** (:func:`ratio_diagnostics`). Any ``r = log q/p`` satisfies
``E_P[e^r] = 1`` and ``E_Q[e^{-r}] = 1``: the log-mean-exps of ``r`` on held-out source rows and of
``-r`` on held-out target rows are 0 for the exact ratio (and noisy when ``P`` and ``Q`` barely
overlap: they are averages of heavy-tailed weights). ``-E_P r`` and ``E_Q r`` are the estimate's
``KL(P || Q)`` and ``KL(Q || P)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.apps.ot.baselines import fit_classifier
from iterflow.apps.ot.classifiers import ClassifierOptions
from iterflow.apps.ot.ratio_base import RatioEstimator
from iterflow.apps.ot.samples import check_points, evenly
from iterflow.errors import check_positive

Map = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DiagnosticOptions:
    """Settings of :func:`endpoint_diagnostics`.

    Attributes:
        classifier: the KL classifiers (network and optimisation; ``batch_size`` per class).
        max_train: at most this many training rows per side (evenly spaced) for the classifiers.
        max_test: at most this many held-out rows per side for the KL means and the MMDs.
    """

    classifier: ClassifierOptions = ClassifierOptions(hidden=(64, 64), steps=800, batch_size=256)
    max_train: int = 10_000
    max_test: int = 2_000

    def __post_init__(self) -> None:
        check_positive(self.max_train, "max_train", integer=True)
        check_positive(self.max_test, "max_test", integer=True)


def classifier_kl(
    a_train: Tensor,
    b_train: Tensor,
    a_test: Tensor,
    options: ClassifierOptions,
    generator: torch.Generator,
) -> float:
    """``KL(A || B) ~ -mean phi(a_test)`` with ``phi ~ log B/A`` a logistic classifier trained on
    ``a_train`` (label 0) and ``b_train`` (label 1); all ``(n, d)``."""
    est = fit_classifier(a_train, b_train, options, generator=generator)
    return float(-est.log_ratio(a_test).double().mean())


def endpoint_diagnostics(
    forward: Map,
    backward: Map,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    options: DiagnosticOptions | None = None,
    *,
    generator: torch.Generator,
) -> dict[str, float]:
    r"""Classifier KLs and MMDs of the two end-point constraints of a transport (module docstring).

    Arguments:
        forward, backward: the maps ``T`` (``P -> Q``) and ``T^{-1}`` in data units, ``(n, d) ->
            (n, d)`` (e.g. :attr:`TransportResult.forward` and ``.backward``).
        train: ``(x, y)`` training rows of ``P`` and ``Q`` (the classifiers learn on them).
        test: ``(x', y')`` held-out rows of ``P`` and ``Q`` (the KL means and the MMDs).
        options: see :class:`DiagnosticOptions`.
        generator: the classifiers' randomness (a generator on the rows' device).

    Returns:
        ``kl_pushed_to_target`` (``KL(T_# P || Q)``), ``kl_pulled_to_source``
        (``KL(T^{-1}_# Q || P)``), ``mmd_pushed_to_target``, ``mmd_pulled_to_source``,
        ``mmd_source_to_target`` (squared MMDs) and ``n_test`` (held-out rows per side).
    """
    from iterflow.metrics import mmd

    options = options or DiagnosticOptions()
    x, y = check_points(train[0], "train"), check_points(train[1], "train", train[0].shape[1])
    xt = check_points(test[0], "test", x.shape[1])
    yt = check_points(test[1], "test", x.shape[1])
    x, y = evenly(x, options.max_train), evenly(y, options.max_train)
    xt, yt = evenly(xt, options.max_test), evenly(yt, options.max_test)
    with torch.no_grad():
        tx, ty, txt, tyt = forward(x), backward(y), forward(xt), backward(yt)
    clf = options.classifier
    return {
        "kl_pushed_to_target": classifier_kl(tx, y, txt, clf, generator),
        "kl_pulled_to_source": classifier_kl(ty, x, tyt, clf, generator),
        "mmd_pushed_to_target": mmd(txt.cpu(), yt.cpu()),
        "mmd_pulled_to_source": mmd(tyt.cpu(), xt.cpu()),
        "mmd_source_to_target": mmd(xt.cpu(), yt.cpu()),
        "n_test": int(min(xt.shape[0], yt.shape[0])),
    }


def endpoint_summary(m: dict[str, Any]) -> str:
    """One readable line of :func:`endpoint_diagnostics`' values (``m`` may hold other keys)."""
    return (
        f"end points (held-out, {m['n_test']} rows/side): KL(T#P||Q) "
        f"{m['kl_pushed_to_target']:.3g}, KL(T^-1#Q||P) {m['kl_pulled_to_source']:.3g} nats "
        f"(classifier); MMD^2(T#P, Q) {m['mmd_pushed_to_target']:.3g}, MMD^2(T^-1#Q, P) "
        f"{m['mmd_pulled_to_source']:.3g} (P vs Q untransported: {m['mmd_source_to_target']:.3g})"
    )


def _log_mean_exp(v: Tensor) -> float:
    return float(torch.logsumexp(v.double(), 0) - math.log(v.shape[0]))


def ratio_diagnostics(
    estimator: RatioEstimator, x_test: Tensor, y_test: Tensor
) -> dict[str, float]:
    r"""Normalisation checks of a log-ratio estimate ``r ~ log q/p`` on held-out rows of ``P``
    (``x_test``) and ``Q`` (``y_test``), ``(n, d)`` each.

    Returns:
        ``log_mean_ratio_source`` (``log mean_P e^r``, 0 when exact), ``log_mean_inverse_target``
        (``log mean_Q e^{-r}``, 0 when exact), ``kl_source_target`` (``-mean_P r``, the estimate of
        ``KL(P || Q)``) and ``kl_target_source`` (``mean_Q r``).
    """
    with torch.no_grad():
        rp, rq = estimator.log_ratio(x_test).double(), estimator.log_ratio(y_test).double()
    return {
        "log_mean_ratio_source": _log_mean_exp(rp),
        "log_mean_inverse_target": _log_mean_exp(-rq),
        "kl_source_target": float(-rp.mean()),
        "kl_target_source": float(rq.mean()),
    }


def ratio_summary(m: dict[str, Any]) -> str:
    """One readable line of :func:`ratio_diagnostics`' values."""
    return (
        f"normalisation (held-out; 0 when exact): log E_P[q/p] {m['log_mean_ratio_source']:.3g}, "
        f"log E_Q[p/q] {m['log_mean_inverse_target']:.3g}; implied KL(P||Q) "
        f"{m['kl_source_target']:.4g}, KL(Q||P) {m['kl_target_source']:.4g} nats"
    )
