"""The augmented integrand of the ODE layer: a block's end point together with its path integrals.

Each block integrates the augmented state ``(x, a, k, j)`` over its time ``s: 0 -> 1``:

.. math::
    \\dot x = v(x, s), \\quad \\dot a = \\operatorname{div} v(x, s), \\quad
    \\dot k = |v(x, s)|^2, \\quad \\dot j = |\\varepsilon^\\top \\partial_x v(x, s)|^2,

so that ``a(1)`` is the log-determinant of the block's map (the change of variables of FFJORD,
arXiv 1810.01367), ``k(1)`` its kinetic energy and ``j(1)`` the integrated squared Jacobian norm
(RNODE, arXiv 2002.02798). Used by the CNF and JKO-flow losses, transport and the worst-case map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.core.flow import EXACT_DIVERGENCE_MAX_DIM, Block
from iterflow.core.ode import SolverSpec, integrate, make_probes
from iterflow.errors import check_choice

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")

AugmentedState = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass
class PathIntegrals:
    """End point and path integrals of one block, per sample.

    Attributes:
        z: ``(B, *E)`` end point ``x(1)``.
        div: ``(B,)`` ``int_0^1 div v(x(s), s) ds`` (the block's log-determinant).
        kinetic: ``(B,)`` ``int_0^1 |v(x(s), s)|^2 ds``.
        jacobian: ``(B,)`` ``int_0^1 |eps^T dv/dx|^2 ds`` (``||dv/dx||_F^2`` with the exact trace).
    """

    z: Tensor
    div: Tensor
    kinetic: Tensor
    jacobian: Tensor


def resolve_divergence(kind: str, dim: int) -> str:
    """``"auto"`` -> ``"exact"`` up to 16 dimensions, else ``"hutchinson"``; others unchanged."""
    check_choice(kind, DIVERGENCES, "option 'divergence'")
    if kind == "auto":
        return "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return kind


def _jacobian_terms(
    v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """Divergence and squared Jacobian norm at one time, each ``(B,)``.

    Exact (``probes is None``): row ``i`` of ``J = dv/dx`` is one vector-Jacobian product, so
    ``tr J = sum_i J_ii`` and ``||J||_F^2 = sum_i |J_i|^2`` (``d`` backward passes). Hutchinson:
    ``eps^T J eps`` and ``|eps^T J|^2`` averaged over the ``K`` probes (``K`` backward passes).
    """
    b = v.shape[0]
    vf = v.reshape(b, -1)
    div = v.new_zeros(b)
    frob = v.new_zeros(b)
    if probes is None:
        for i in range(vf.shape[1]):
            row = torch.autograd.grad(
                vf[:, i].sum(), x, create_graph=create_graph, retain_graph=True
            )[0]
            row = row.reshape(b, -1)  # (B, d): dv_i/dx
            div = div + row[:, i]
            frob = frob + row.pow(2).sum(1)
        return div, frob
    for eps in probes:
        g = torch.autograd.grad(v, x, eps, create_graph=create_graph, retain_graph=True)[
            0
        ]  # eps^T J
        div = div + (g * eps).reshape(b, -1).sum(1)
        frob = frob + g.pow(2).reshape(b, -1).sum(1)
    k = probes.shape[0]
    return div / k, frob / k


def augmented_field(
    block: Block, probes: Tensor | None, create_graph: bool
) -> Callable[[Tensor, AugmentedState], AugmentedState]:
    """The vector field of the augmented state ``(x, a, k, j)`` (see the module docstring).

    Arguments:
        block: the block whose velocity is integrated.
        probes: ``(K, B, *E)`` Hutchinson probes held fixed along the path, or ``None`` (exact).
        create_graph: keep the graph so that the integrals can be differentiated (training).
    """

    def field(t: Tensor, state: AugmentedState) -> AugmentedState:
        x = state[0]
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = block(x, t)
            div, frob = _jacobian_terms(v, x, probes, create_graph)
            kin = v.pow(2).reshape(v.shape[0], -1).sum(1)
        if not create_graph:
            v, div, kin, frob = v.detach(), div.detach(), kin.detach(), frob.detach()
        return v, div, kin, frob

    return field


def integrate_path(
    block: Block,
    x: Tensor,
    spec: SolverSpec,
    *,
    probes: Tensor | None = None,
    create_graph: bool = True,
) -> PathIntegrals:
    """Integrate one block over ``s: 0 -> 1`` with its divergence, kinetic and Jacobian integrals.

    Arguments:
        block: the block.
        x: ``(B, *E)`` start points (model units).
        spec: solver (fixed-step or adaptive; adaptive solvers are differentiated through their steps).
        probes: ``(K, B, *E)`` Hutchinson probes, or ``None`` for the exact trace.
        create_graph: differentiable results (training) or detached ones (evaluation).

    Returns:
        :class:`PathIntegrals` of the block.

    Example:
        >>> from iterflow.nn import MLPVelocity
        >>> blk = Block(MLPVelocity(2, hidden=(8,)))
        >>> r = integrate_path(blk, torch.zeros(3, 2), SolverSpec("rk4", 2), create_graph=False)
        >>> r.z.shape, r.div.shape
        (torch.Size([3, 2]), torch.Size([3]))
    """
    zero = x.new_zeros(x.shape[0])
    state0: AugmentedState = (x, zero, zero, zero)
    z, div, kin, jac = integrate(
        augmented_field(block, probes, create_graph), state0, 0.0, 1.0, spec
    )  # type: ignore[misc]
    return PathIntegrals(z, div, kin, jac)


def draw_probes(
    x: Tensor, divergence: str, probes: int, probe_kind: str, generator: torch.Generator | None
) -> Tensor | None:
    """Hutchinson probes ``(K, B, *E)`` for ``x``, or ``None`` when the trace is exact."""
    dim = x[0].numel()
    if resolve_divergence(divergence, dim) == "exact":
        return None
    return make_probes(
        tuple(x.shape), probes, kind=probe_kind, generator=generator, dtype=x.dtype, device=x.device
    )
