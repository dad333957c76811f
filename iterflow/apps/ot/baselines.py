"""Baseline density-ratio estimators: one logistic classifier between ``p`` and ``q``
(:class:`ClassifierRatio`) and the difference of two Gaussian kernel density estimates with
cross-validated bandwidths (:class:`KDERatio`, scikit-learn ``KernelDensity`` and ``GridSearchCV``).

Both work on the pooled per-dimension standardisation of the samples; unlike the telescopic
estimator they face the "density chasm" when ``p`` and ``q`` barely overlap (Rhodes et al. 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iterflow.apps.ot.classifiers import ClassifierOptions, LogitNet
from iterflow.apps.ot.phases import ProgressFn, Runtime, seeded
from iterflow.apps.ot.ratio_base import (
    RatioEstimator,
    cached_estimator,
    commit_estimator,
    fit_logistic,
    load_module,
    prefixed,
)
from iterflow.apps.ot.samples import (
    check_points,
    draw_rows,
    evenly,
    fingerprint,
    generator_fingerprint,
    pooled_standardization,
)
from iterflow.core.distributed import DistContext
from iterflow.errors import check_positive, fail
from iterflow.methods import Loss
from iterflow.methods.classifier import logistic_loss
from iterflow.train import StepBudget


class ClassifierRatio(RatioEstimator):
    """One logistic classifier between ``p`` (label 0) and ``q`` (label 1): ``log q/p = phi(u)``."""

    kind = "classifier"

    def __init__(self, net: LogitNet, shift: Tensor, scale: Tensor) -> None:
        super().__init__(shift, scale)
        self.net = net.eval()

    def log_ratio_u(self, u: Tensor) -> Tensor:
        return self.net(u.to(self.shift.dtype)).to(u.dtype)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {"net": self.net.config()}, prefixed(self.net, "net.")

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> ClassifierRatio:
        net = load_module(LogitNet(**config["net"]), tensors, "net.")
        return cls(net, tensors["shift"], tensors["scale"])  # type: ignore[arg-type]


def fit_classifier(
    source: Tensor,
    target: Tensor,
    options: ClassifierOptions | None = None,
    *,
    generator: torch.Generator,
    folder: str | Path | None = None,
    progress: ProgressFn | None = None,
    ctx: DistContext | None = None,
    autocast: torch.dtype | None = None,
    checkpoint_every: int = 200,
    budget: StepBudget | None = None,
) -> ClassifierRatio:
    """Baseline: one logistic classifier on ``p`` vs ``q`` (pooled per-dimension standardisation).

    Arguments:
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q``.
        options: network and optimisation (``batch_size`` per class).
        generator: the only source of randomness.
        folder, progress, ctx, autocast, checkpoint_every, budget: as in
            :func:`~iterflow.apps.ot.telescopic.fit_telescopic`.
    """
    options = options or ClassifierOptions()
    source = check_points(source, "source")
    target = check_points(target, "target", source.shape[1])
    runtime = Runtime(progress, ctx, autocast, checkpoint_every, budget or StepBudget(None))
    config = {
        "estimator": ClassifierRatio.kind,
        "options": options.to_json(),
        "samples": fingerprint(source, target),
        "generator": generator_fingerprint(generator),
    }
    cached = cached_estimator(folder, ClassifierRatio, config, source.device)
    if cached is not None:
        return cached
    shift, scale = pooled_standardization(source, target)
    u_p, u_q = (source - shift) / scale, (target - shift) / scale
    net = seeded(lambda: LogitNet(source.shape[1], options.hidden, options.activation), generator)
    net = net.to(device=source.device, dtype=source.dtype)

    def draw(gen: torch.Generator, b: int) -> tuple[Tensor, ...]:
        return draw_rows(u_p, b, gen), draw_rows(u_q, b, gen)

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return logistic_loss(net, batch[0], batch[1])

    fit_logistic(net, loss_fn, draw, options, generator=generator, label="single classifier",
                 runtime=runtime, folder=folder, config=config)  # fmt: skip
    est = ClassifierRatio(net, shift, scale)  # type: ignore[arg-type]
    return commit_estimator(est, folder, config, runtime)


@dataclass(frozen=True)
class KDEOptions:
    """Options of :func:`fit_kde`.

    Attributes:
        bandwidths: candidate bandwidths in standardised units; empty: ``n_bandwidths`` values
            log-spaced from ``0.05`` to ``2`` times Scott's factor ``n^{-1/(d+4)}``.
        n_bandwidths: size of the default grid.
        folds: cross-validation folds (``GridSearchCV`` with unshuffled ``KFold``: deterministic).
        max_points: at most this many points per side are kept (evenly spaced) to bound the cost.
    """

    bandwidths: tuple[float, ...] = ()
    n_bandwidths: int = 16
    folds: int = 5
    max_points: int = 5000

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidths", tuple(float(b) for b in self.bandwidths))
        for bw in self.bandwidths:
            check_positive(bw, "bandwidths")
        check_positive(self.n_bandwidths, "n_bandwidths", integer=True)
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            fail("folds", "must be an integer >= 2", self.folds)
        check_positive(self.max_points, "max_points", integer=True)


class KDERatio(RatioEstimator):
    """``log q_kde(u) - log p_kde(u)`` with Gaussian kernels (scikit-learn ``KernelDensity``)."""

    kind = "kde"

    def __init__(
        self,
        points_p: Tensor,
        points_q: Tensor,
        bandwidth_p: float,
        bandwidth_q: float,
        shift: Tensor,
        scale: Tensor,
    ) -> None:
        super().__init__(shift, scale)
        from sklearn.neighbors import KernelDensity  # type: ignore[import-untyped]

        self.points_p, self.points_q = points_p.detach(), points_q.detach()
        self.bandwidth_p, self.bandwidth_q = float(bandwidth_p), float(bandwidth_q)
        self._kde_p = KernelDensity(bandwidth=self.bandwidth_p).fit(_np(self.points_p))
        self._kde_q = KernelDensity(bandwidth=self.bandwidth_q).fit(_np(self.points_q))

    def log_ratio_u(self, u: Tensor) -> Tensor:
        uu = _np(u)
        out = self._kde_q.score_samples(uu) - self._kde_p.score_samples(uu)
        return torch.as_tensor(out, dtype=u.dtype, device=u.device)

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        cfg = {"bandwidth_p": self.bandwidth_p, "bandwidth_q": self.bandwidth_q}
        return cfg, {"points_p": self.points_p, "points_q": self.points_q}

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> KDERatio:
        return cls(
            tensors["points_p"],
            tensors["points_q"],
            float(config["bandwidth_p"]),
            float(config["bandwidth_q"]),
            tensors["shift"],
            tensors["scale"],
        )


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def cv_bandwidth(points: Tensor, bandwidths: Sequence[float], folds: int) -> float:
    """The bandwidth of a Gaussian KDE with the best ``folds``-fold held-out log-likelihood."""
    from sklearn.model_selection import GridSearchCV, KFold  # type: ignore[import-untyped]
    from sklearn.neighbors import KernelDensity  # type: ignore[import-untyped]

    search = GridSearchCV(KernelDensity(), {"bandwidth": list(bandwidths)}, cv=KFold(folds))
    search.fit(_np(points))
    return float(search.best_params_["bandwidth"])


def fit_kde(source: Tensor, target: Tensor, options: KDEOptions | None = None) -> KDERatio:
    """Baseline: Gaussian KDEs of ``p`` and ``q`` with cross-validated bandwidths.

    Both sides are standardised with the pooled per-dimension mean and standard deviation first.

    Arguments:
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q``.
        options: bandwidth grid, folds and point cap (see :class:`KDEOptions`).
    """
    options = options or KDEOptions()
    source = check_points(source, "source")
    target = check_points(target, "target", source.shape[1])
    shift, scale = pooled_standardization(source, target)
    u_p = evenly((source - shift) / scale, options.max_points)
    u_q = evenly((target - shift) / scale, options.max_points)
    bws = []
    for u in (u_p, u_q):
        grid = options.bandwidths
        if not grid:
            scott = u.shape[0] ** (-1.0 / (u.shape[1] + 4)) * float(u.std(0).mean())
            grid = tuple(np.geomspace(0.05 * scott, 2.0 * scott, options.n_bandwidths).tolist())
        bws.append(cv_bandwidth(u, grid, options.folds))
    return KDERatio(u_p, u_q, bws[0], bws[1], shift, scale)
