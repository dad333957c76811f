r"""Flow-based optimal transport between two sample sets: the objective (Xu, Cheng & Xie, AISTATS 2025,
arXiv 2305.11857; METHODS.md section 5).

A flow ``T`` of ``B`` blocks carries ``P`` (start) to ``Q`` (end) with near-minimal kinetic energy,
trained on the relaxed Benamou-Brenier problem (tutorial eq. 27)

.. math::
    \int_0^1 E \lVert v \rVert^2 dt + \gamma\, KL(T_\# P \,\|\, Q) + \gamma\, KL(T^{-1}_\# Q \,\|\, P),

each KL estimated by a logistic classifier (:class:`KLClassifiers`): ``c_f ~ log Q / T_# P`` (trained
on ``T(x)``, label 0, against ``y ~ Q``, label 1) gives ``KL(T_# P || Q) = -E_P c_f(T x)``, and
``c_b ~ log P / T^{-1}_# Q`` likewise. Three per-row losses, all in model units:

- :func:`segment_matching_loss`: the initialisation by flow matching on minibatch-OT pairs, block
  ``n`` regressing on the segment ``x0 + (n/B)(x1 - x0) -> x0 + ((n+1)/B)(x1 - x0)``;
- :func:`kl_classifier_loss`: the classifiers' logistic loss on particles moved *without* gradients
  (the flow gets no gradient from it);
- :func:`relaxed_ot_loss`: the objective above through the classifiers with *frozen* weights
  (``torch.func.functional_call`` with detached parameters: the classifiers get no gradient from it).

:func:`joint_loss` adds the last two, so that one optimiser step on one module holding the flow and
the classifiers updates each part on its own loss.

**Kinetic term.** Each path's kinetic energy ``int_0^1 |v|^2 dt`` (global time) is integrated by
the one augmented integrand of the ODE layer (:func:`iterflow.core.integrand.integrate_chain` with
the kinetic integral only: no backward pass, no extra velocity evaluation), along the same
fixed-step solver that moves the particles; the backward paths run the blocks through
:class:`iterflow.core.integrand.Reversed`. Block ``n`` of ``B`` spans ``1/B`` of the global time, so
its global-time velocity is ``B v_n`` and the chain's energy is ``B sum_n int_0^1 |v_n|^2 ds``
(:func:`transport_integrals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from iterflow.core.couplings import COUPLINGS, couple
from iterflow.core.distributed import local_rows
from iterflow.core.flow import Block, Flow
from iterflow.core.integrand import PathIntegrals, Reversed, integrate_chain
from iterflow.core.ode import FIXED_SOLVERS, SolverSpec
from iterflow.errors import check_positive, fail
from iterflow.methods.base import Loss
from iterflow.methods.classifier import logistic_loss
from iterflow.methods.fm import FMOptions, flow_matching_loss


@dataclass(frozen=True)
class FlowOTOptions:
    """Options of the flow-OT objective.

    Attributes:
        gamma: weight of the two KL terms (large: the end points must match).
        solver, steps: fixed-step solver and steps per block of the paths that are differentiated.
        coupling: pairing of the initialisation, ``"ot"`` (exact minibatch OT), ``"sinkhorn"`` or
            ``"independent"``; ot_chunk: solve the minibatch OT on chunks of this many rows (0: the
            whole batch up to 128 rows, chunks of about 48 above).
    """

    gamma: float = 100.0
    solver: str = "rk4"
    steps: int = 2
    coupling: str = "ot"
    ot_chunk: int = 0

    def __post_init__(self) -> None:
        check_positive(self.gamma, "gamma")
        FIXED_SOLVERS.get(self.solver, "solver")
        check_positive(self.steps, "steps", integer=True)
        COUPLINGS.get(self.coupling, "coupling")
        check_positive(self.ot_chunk, "ot_chunk", integer=True, allow_zero=True)

    def spec(self) -> SolverSpec:
        """The solver of the differentiated paths."""
        return SolverSpec(self.solver, self.steps)


class KLClassifiers(nn.Module):
    """The two logits of the KL terms: ``fwd`` (``c_f ~ log Q / T_# P``) and ``bwd``
    (``c_b ~ log P / T^{-1}_# Q``), each mapping ``(b, d)`` model-unit points to ``(b,)``."""

    def __init__(self, fwd: nn.Module, bwd: nn.Module) -> None:
        super().__init__()
        self.fwd, self.bwd = fwd, bwd


def blocks_of(flow: Flow, *, reverse: bool = False) -> list[Block]:
    """The blocks of ``flow`` in order (last first when ``reverse``)."""
    blocks = cast("list[Block]", list(flow.blocks))
    return blocks[::-1] if reverse else blocks


def transport_integrals(
    flow: Flow, u: Tensor, spec: SolverSpec, *, reverse: bool = False, create_graph: bool = True
) -> PathIntegrals:
    """End points ``(b, d)`` and global-time kinetic energies ``(b,)`` of model-unit particles ``u``
    carried through all blocks (backwards, last block first, when ``reverse``).

    ``kinetic`` is ``B sum_n int_0^1 |v_n(x(s), s)|^2 ds`` (see the module docstring); with
    ``create_graph=False`` nothing is differentiable and no graph is kept.
    """
    blocks = [Reversed(b) if reverse else b for b in blocks_of(flow, reverse=reverse)]
    r = integrate_chain(
        blocks, u, spec, create_graph=create_graph, divergence=False, jacobian=False, kinetic=True
    )
    return PathIntegrals(r.z, r.div, flow.num_blocks * r.kinetic, r.jacobian)


def segment_matching_loss(
    flow: Flow, x0: Tensor, x1: Tensor, options: FlowOTOptions, generator: torch.Generator
) -> Loss:
    """Flow matching of every block on its segment of coupled pairs ``(x0, x1)`` ``(n, d)``.

    The pairs are coupled with ``options.coupling`` (on the whole batch); block ``n`` of ``B``
    regresses on ``a_n = x0 + (n/B)(x1 - x0) -> a_{n+1}`` (:func:`iterflow.methods.fm.flow_matching_loss`).
    Per row: ``B sum_n l_n``, i.e. ``B^2`` times the blocks' mean loss (global-time velocity units).
    """
    if flow.num_blocks == 0:
        fail("flow", "must have at least one block", 0)
    x0, x1 = couple(x0, x1, options.coupling, chunk=options.ot_chunk, generator=generator)
    nb, fm = flow.num_blocks, FMOptions()  # the pairs are coupled: independent from here on
    parts = []
    for n, b in enumerate(blocks_of(flow)):
        a0, a1 = x0 + (n / nb) * (x1 - x0), x0 + ((n + 1) / nb) * (x1 - x0)
        parts.append(flow_matching_loss(b.velocity, a0, a1, fm, generator))
    total = sum(parts[1:], parts[0])
    loss = total.scaled(float(nb))
    loss.terms = {"fm": loss.rows.detach()}
    return loss


def kl_classifier_loss(
    classifiers: KLClassifiers, flow: Flow, x: Tensor, y: Tensor, spec: SolverSpec
) -> Loss:
    """Logistic loss of ``c_f`` (``T(x)`` vs ``y``) plus that of ``c_b`` (``T^{-1}(y)`` vs ``x``),
    per pair ``(x_i, y_i)`` of model-unit samples ``(n, d)``; the particles move without gradients."""
    n, rows = x.shape[0], local_rows(x.shape[0])
    with torch.no_grad():  # only this process's rows are moved (the loss reads no other row)
        z, w = x.clone(), y.clone()
        z[rows] = transport_integrals(flow, x[rows], spec, create_graph=False).z
        w[rows] = transport_integrals(flow, y[rows], spec, reverse=True, create_graph=False).z
    fwd, bwd = logistic_loss(classifiers.fwd, z, y), logistic_loss(classifiers.bwd, w, x)
    per_row = fwd.rows + bwd.rows
    return Loss(per_row, n, {"logistic": per_row.detach()})


def frozen_call(module: nn.Module, *args: Tensor) -> Tensor:
    """``module(*args)`` with detached parameters: gradients reach the inputs, not the module."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    return torch.func.functional_call(module, params, args)


def relaxed_ot_loss(
    flow: Flow, classifiers: KLClassifiers, x: Tensor, y: Tensor, options: FlowOTOptions
) -> Loss:
    """``(E_f + E_b) / 2 - gamma (c_f(T x) + c_b(T^{-1} y))`` per pair of model-unit samples
    ``x ~ P``, ``y ~ Q`` ``(n, d)``: kinetic energies of both paths (:func:`transport_integrals`) and the
    classifier-estimated KLs, the classifiers frozen."""
    n, rows = x.shape[0], local_rows(x.shape[0])
    spec = options.spec()
    fwd = transport_integrals(flow, x[rows], spec)
    bwd = transport_integrals(flow, y[rows], spec, reverse=True)
    kinetic = 0.5 * (fwd.kinetic + bwd.kinetic)
    kl_f = -frozen_call(classifiers.fwd, fwd.z)
    kl_b = -frozen_call(classifiers.bwd, bwd.z)
    per_row = kinetic + options.gamma * (kl_f + kl_b)
    terms = {"kinetic": kinetic.detach(), "kl_fwd": kl_f.detach(), "kl_bwd": kl_b.detach()}
    return Loss(per_row, n, terms)


def joint_loss(
    flow: Flow,
    classifiers: KLClassifiers,
    batch: tuple[Tensor, Tensor, Tensor, Tensor],
    options: FlowOTOptions,
) -> Loss:
    """:func:`relaxed_ot_loss` on ``(x, y)`` plus :func:`kl_classifier_loss` on ``(x_c, y_c)`` for
    ``batch = (x, y, x_c, y_c)``: the two batches may differ in size (:func:`join_losses`)."""
    x, y, x_c, y_c = batch
    return join_losses(
        relaxed_ot_loss(flow, classifiers, x, y, options),
        kl_classifier_loss(classifiers, flow, x_c, y_c, options.spec()),
    )


def join_losses(*losses: Loss) -> Loss:
    """The sum of the means of losses over batches of different sizes, as one :class:`Loss`.

    Loss ``i`` of ``n_i`` rows contributes its rows scaled by ``N / n_i`` (``N = sum_i n_i``) to
    one batch of ``N`` rows, so the mean of the joined rows is ``sum_i mean_i`` in one process
    and under data parallelism alike; each term is scaled the same way and is zero on the other
    losses' rows, so that it still logs its own mean.
    """
    n = sum(loss.n for loss in losses)
    parts = [loss.rows * (n / loss.n) for loss in losses]
    rows = torch.cat(parts)
    terms: dict[str, Tensor] = {}
    offset = 0
    for loss, part in zip(losses, parts):
        for name, v in loss.terms.items():
            t = terms.setdefault(name, rows.new_zeros(rows.shape[0]).detach())
            t[offset : offset + part.shape[0]] += v.detach().to(t.dtype) * (n / loss.n)
        offset += part.shape[0]
    extras = [loss.extra for loss in losses if loss.extra is not None]
    return Loss(rows, n, terms, sum(extras[1:], extras[0]) if extras else None)
