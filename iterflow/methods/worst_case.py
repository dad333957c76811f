r"""The worst-case objective of flow-based distributionally robust optimisation (FlowDRO).

A flow map ``F`` (one or a few ODE blocks) moves samples ``x ~ P`` toward higher risk ``R`` within a
Wasserstein-2 budget set by the Lagrange parameter ``gamma``; per row ``i`` of a minibatch the loss is

.. math::

    \ell_i = -R(F(x_i)) + \frac{|x_i - F(x_i)|^2}{2\gamma}
             + \frac{\lambda}{2\gamma}\Big(K \sum_{k=1}^K \int_0^1 |v_k|^2\,ds - |F(x_i) - x_i|^2\Big),

whose mean is minimised: ``min_F E[-R(F(X))] + E|X - F(X)|^2 / (2 gamma)`` is the Lagrangian
(Moreau-envelope) form of Wasserstein DRO, and the last term (weight ``lambda = kinetic``, ``K``
blocks, velocities in data units) is the path regulariser: by Cauchy-Schwarz it is ``>= 0`` and 0
exactly for straight paths at constant speed, which reach the optimum, so it straightens the paths
without moving the optimum. The kinetic energy comes from the one augmented integrand of the ODE
layer (:func:`iterflow.core.integrand.integrate_path`).

Each row is computed only on this process's rows (:func:`iterflow.core.distributed.local_rows`);
the loop (:func:`iterflow.train.loop.optimize`) reduces them.

References:
    Xu, Lee, Cheng, Xie, "Flow-based distributionally robust optimization", IEEE JSAIT 2024,
    arXiv 2310.19253. Sinha, Namkoong, Duchi, "Certifying some distributional robustness with
    principled adversarial training", ICLR 2018, arXiv 1710.10571.

Example:
    >>> import torch
    >>> from iterflow.core.flow import Block, Flow
    >>> from iterflow.core.nn import MLPVelocity
    >>> flow = Flow([Block(MLPVelocity(2, hidden=(8,), zero_init=True))], (2,))
    >>> opts = WorstCaseOptions(gamma=0.5, ode_steps=2)
    >>> x = torch.zeros(4, 2)
    >>> loss = worst_case_loss(flow, flow.blocks, x, None, lambda y, c: y[:, 0], 0.5, opts)
    >>> loss.rows.shape, float(loss.value().detach())  # the identity map: no risk gained, no cost
    (torch.Size([4]), 0.0)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from iterflow.core.distributed import local_rows
from iterflow.core.flow import Flow
from iterflow.core.integrand import DataUnits, integrate_path
from iterflow.core.ode import FIXED_SOLVERS, SolverSpec
from iterflow.errors import check_positive, fail
from iterflow.methods.base import Loss

#: ``risk(y, labels) -> (B,)``: the risk of each image ``y`` (``labels`` ``(B,)`` or ``None``).
RiskFn = Callable[[Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class WorstCaseOptions:
    """Options of the worst-case objective.

    Attributes:
        gamma: Lagrange parameter of the Wasserstein budget (larger: farther moves).
        kinetic: weight ``lambda`` of the path regulariser (0: none; 1: the transport term becomes
            the kinetic energy, the Benamou-Brenier form).
        solver, ode_steps: the fixed-step solver of every block and its steps per block.
        gamma_warmup, gamma_start: continuation in ``gamma``: over the first ``gamma_warmup`` of the
            optimiser steps the Lagrange parameter grows geometrically from ``gamma * gamma_start``
            to ``gamma`` (see :meth:`gamma_at`); 0 turns it off.
    """

    gamma: float = 1.0
    kinetic: float = 0.0
    solver: str = "rk4"
    ode_steps: int = 8
    gamma_warmup: float = 0.6
    gamma_start: float = 1 / 16

    def __post_init__(self) -> None:
        check_positive(self.gamma, "gamma")
        check_positive(self.kinetic, "kinetic", allow_zero=True)
        FIXED_SOLVERS.get(self.solver, "solver")
        check_positive(self.ode_steps, "ode_steps", integer=True)
        if not 0.0 <= self.gamma_warmup < 1.0:
            fail("gamma_warmup", "must be in [0, 1) (a fraction of the steps)", self.gamma_warmup)
        if not 0.0 < self.gamma_start <= 1.0:
            fail("gamma_start", "must be in (0, 1] (a fraction of gamma)", self.gamma_start)

    @property
    def spec(self) -> SolverSpec:
        """The blocks' solver."""
        return SolverSpec(self.solver, self.ode_steps)

    def gamma_at(self, step: int, steps: int, gamma: float | None = None) -> float:
        """Lagrange parameter at optimiser ``step`` (0-based) of ``steps``: geometric from
        ``gamma * gamma_start`` to ``gamma`` over the first ``gamma_warmup`` of the steps, then
        ``gamma`` (default ``self.gamma``; a progressive chain passes its per-block share).

        Example:
            >>> o = WorstCaseOptions(gamma=2.0, gamma_warmup=0.5, gamma_start=0.25)
            >>> o.gamma_at(0, 10), o.gamma_at(5, 10), o.gamma_at(9, 10)
            (0.5, 2.0, 2.0)
        """
        g = self.gamma if gamma is None else gamma
        warm = int(self.gamma_warmup * steps)
        if step >= warm:
            return g
        return g * self.gamma_start ** (1 - step / warm)


@contextmanager
def conditioned(blocks: Sequence[nn.Module], labels: Tensor | None) -> Iterator[None]:
    """Hand ``labels`` ``(B,)`` to every label-conditional block velocity (``num_classes > 0``) for
    the duration; a no-op for ``None``."""
    with ExitStack() as stack:
        if labels is not None:
            for b in blocks:
                if getattr(b.velocity, "num_classes", 0) > 0:
                    stack.enter_context(b.velocity.condition(labels))  # type: ignore[union-attr,operator]
        yield


def push(
    flow: Flow,
    x: Tensor,
    spec: SolverSpec,
    *,
    blocks: Sequence[nn.Module] | None = None,
    labels: Tensor | None = None,
    create_graph: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(F(x), sum_k int_0^1 |v_k|^2 ds)`` in data units through ``blocks`` (default: all of
    ``flow``'s, with its normalisation), shapes ``(B, d)`` and ``(B,)``.

    Arguments:
        flow: holds the normalisation (and the blocks); x: ``(B, d)`` points in data units.
        spec: fixed-step solver; labels: ``(B,)`` classes of label-conditional blocks.
        create_graph: differentiable results (training) or detached ones.
    """
    chain = list(flow.blocks) if blocks is None else list(blocks)
    total = x.new_zeros(x.shape[0])
    shift, scale = cast(Tensor, flow.shift), cast(Tensor, flow.scale)
    with conditioned(chain, labels):
        for b in chain:
            r = integrate_path(DataUnits(b, shift, scale), x, spec,
                               create_graph=create_graph, divergence=False, jacobian=False)  # fmt: skip
            x, total = r.z, total + r.kinetic
    return x, total


def worst_case_loss(
    flow: Flow,
    blocks: Sequence[nn.Module],
    x: Tensor,
    labels: Tensor | None,
    risk: RiskFn,
    gamma: float,
    options: WorstCaseOptions,
) -> Loss:
    """Per-row worst-case loss of a minibatch (see the module docstring).

    Arguments:
        flow: the map's normalisation; blocks: the blocks that ``F`` integrates (all of the flow's,
            or one block of a progressive chain, applied to already pushed points).
        x: ``(n, d)`` the global minibatch in data units; labels: ``(n,)`` or ``None`` (they go to
            the risk and to label-conditional velocities).
        risk: ``risk(y, labels) -> (b,)``; gamma: this step's Lagrange parameter (see
            :meth:`WorstCaseOptions.gamma_at`); options: the kinetic weight and the solver.

    Returns:
        :class:`~iterflow.methods.base.Loss` of this process's rows, with the per-row ``risk``,
        ``cost`` ``|x - F(x)|^2`` and ``kinetic_excess`` ``K int |v|^2 - cost``.
    """
    n = x.shape[0]
    rows = local_rows(n)
    x = x[rows]
    lab = None if labels is None else labels[rows]
    y, kin = push(flow, x, options.spec, blocks=blocks, labels=lab)
    r = risk(y, lab)
    cost = (y - x).pow(2).sum(1)
    excess = len(blocks) * kin - cost
    per_row = cost / (2 * gamma) - r
    if options.kinetic > 0:
        per_row = per_row + options.kinetic * excess / (2 * gamma)
    terms = {"risk": r.detach(), "cost": cost.detach(), "kinetic_excess": excess.detach()}
    return Loss(per_row, n, terms)
