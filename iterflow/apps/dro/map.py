"""The learned worst-case map ``F`` (:class:`WorstCaseMap`), the assessment of a map on a set of
points (:func:`assess`) and what a fit returns (:class:`WorstCaseResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from iterflow.apps.dro.classifier import accuracy
from iterflow.apps.dro.config import DROConfig
from iterflow.apps.dro.data import check_label_range, check_labels, check_points
from iterflow.apps.dro.risks import ClassifierLoss, Risk, risk_values
from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import fail
from iterflow.methods.worst_case import conditioned, push


class WorstCaseMap:
    """The learned transport map ``F`` (data units -> data units), ``F(x)`` or, label-conditioned,
    ``F(x, c)``.

    Arguments:
        flow: the blocks and the normalisation; spec: the fixed-step solver.

    ``map(x, labels=...)`` integrates every block forward (``s: 0 -> 1``); ``map.inverse(y, labels=...)``
    backward. A conditioned map (:attr:`num_classes` > 0) needs ``labels``: ``(B,)`` integers in
    ``[0, num_classes)``, one per point (for a classifier risk: the points' true labels, or the
    classifier's predictions when there are none); an unconditioned map ignores valid labels.
    """

    def __init__(self, flow: Flow, spec: SolverSpec) -> None:
        self.flow, self.spec = flow, spec

    @property
    def num_classes(self) -> int:
        """Classes the map is conditioned on (0: a map of ``x`` alone)."""
        return int(getattr(self.flow.blocks[0].velocity, "num_classes", 0))

    def _labels(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        k = self.num_classes
        if labels is None:
            if k > 0:
                fail(
                    "labels",
                    f"are required by a label-conditioned map (num_classes={k}): pass "
                    "labels=(B,) integer classes",
                    None,
                )
            return None
        check_labels(x, labels)
        if k == 0:
            return None
        check_label_range(labels, k, f"must lie in [0, {k})")
        return labels.to(x.device)

    def _check(self, x: Tensor, argument: str) -> Tensor:
        check_points(x, argument)
        if x.shape[1] != self.flow.dim:
            fail(argument, f"must have shape (batch, {self.flow.dim})", tuple(x.shape))
        if x.device != self.device:
            fail(argument, f"must be on the map's device {self.device}", str(x.device))
        return x

    def __call__(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """``F(x)``, shape ``(B, d)``, in ``x``'s dtype; differentiable when grad mode is on."""
        x = self._check(x, "x")
        lab = self._labels(x, labels)
        return push(self.flow, x.to(self.dtype), self.spec, labels=lab)[0].to(x.dtype)

    def inverse(self, y: Tensor, labels: Tensor | None = None) -> Tensor:
        """``F^{-1}(y)`` (up to solver error), shape ``(B, d)``, in ``y``'s dtype."""
        y = self._check(y, "y")
        with conditioned(self.flow.blocks, self._labels(y, labels)):  # type: ignore[arg-type]
            u = self.flow.decode(self.flow.normalize(y.to(self.dtype)), solver=self.spec)
        return u.to(y.dtype)

    def trajectory(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Paths ``(blocks * steps + 1, B, d)`` in data units from ``x`` to ``F(x)``."""
        x = self._check(x, "x")
        with conditioned(self.flow.blocks, self._labels(x, labels)):  # type: ignore[arg-type]
            return self.flow.trajectory(x, direction="encode", solver=self.spec)

    @property
    def dtype(self) -> torch.dtype:
        return cast(Tensor, self.flow.shift).dtype

    @property
    def device(self) -> torch.device:
        return cast(Tensor, self.flow.shift).device


@dataclass(frozen=True)
class Assessment:
    """Transport cost, risk and (for classifiers) accuracy before and after a map, on one set of points.

    Attributes:
        n: number of points.
        transport_cost: ``E|X - F(X)|^2`` (an upper bound on ``W2^2(P, F#P)``).
        risk_before, risk_after: ``E R(X)`` and ``E R(F(X))``.
        objective: ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)`` (``None`` without ``gamma``).
        accuracy_before, accuracy_after: classifier accuracy on ``X`` and ``F(X)`` (classifier risks).
    """

    n: int
    transport_cost: float
    risk_before: float
    risk_after: float
    objective: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    @property
    def risk_increase(self) -> float:
        return self.risk_after - self.risk_before

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "risk_increase": self.risk_increase}


@torch.no_grad()
def assess(
    x: Tensor,
    y: Tensor,
    risk: Risk | ClassifierLoss,
    labels: Tensor | None = None,
    gamma: float | None = None,
) -> Assessment:
    """Compare points ``x`` with their images ``y = F(x)`` (both ``(n, d)``): cost, risk, accuracy."""
    check_points(x, "x")
    if not isinstance(y, Tensor) or y.shape != x.shape:
        fail("y", f"must have the shape of x {tuple(x.shape)}", tuple(getattr(y, "shape", ())))
    cost = float(((y - x) ** 2).sum(1).mean())
    r0, r1 = float(risk_values(risk, x, labels).mean()), float(risk_values(risk, y, labels).mean())
    acc0 = acc1 = None
    if isinstance(risk, ClassifierLoss) and labels is not None:
        acc0, acc1 = accuracy(risk.classifier, x, labels), accuracy(risk.classifier, y, labels)
    obj = None if gamma is None else r1 - cost / (2 * gamma)
    return Assessment(int(x.shape[0]), cost, r0, r1, obj, acc0, acc1)


@dataclass
class WorstCaseResult:
    """What :func:`fit_worst_case` returns.

    Attributes:
        map: the learned map ``F``; config: its options; train: the assessment on the training points.
        history: records ``{block, step, gamma, loss, risk, cost, kinetic_excess}`` every ``log_every``
            steps (``gamma``: the Lagrange parameter of that step, see ``DROConfig.gamma_warmup``).
        seconds: training wall time.
    """

    map: WorstCaseMap
    config: DROConfig
    train: Assessment
    history: list[dict[str, float]]
    seconds: float
