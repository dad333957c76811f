"""The one augmented integrand of the ODE layer: a block's end point together with its path integrals.

Each block integrates the augmented state ``(x, a, k, j)`` over its time ``s: 0 -> 1``:

.. math::
    \\dot x = v(x, s), \\quad \\dot a = \\operatorname{div} v(x, s), \\quad
    \\dot k = |v(x, s)|^2, \\quad \\dot j = \\|\\partial_x v(x, s)\\|_F^2
    \\ \\text{(or its Hutchinson estimate } |\\varepsilon^\\top \\partial_x v|^2),

so that ``a(1)`` is the log-determinant of the block's map (the instantaneous change of variables of
FFJORD, arXiv 1810.01367), ``k(1)`` its kinetic energy and ``j(1)`` the integrated squared Jacobian
norm (RNODE, arXiv 2002.02798). Each integral is optional: a caller integrates only what it asks for
(``divergence=False``, ``kinetic=False``, ``jacobian=False``), and without the divergence and the
Jacobian norm no backward pass is made at all. Used by :meth:`iterflow.core.flow.Flow.log_prob`, the
CNF and JKO-flow losses, transport (forwards and, through :class:`Reversed`, backwards) and the
worst-case map (in data units through :class:`DataUnits`).

The divergence is exact (``d`` Jacobian-vector products) or Hutchinson's estimate (``K`` random
probes held fixed along the path); the ONE ``auto`` rule, :func:`resolve_divergence`, takes the exact
trace up to :data:`EXACT_DIVERGENCE_MAX_DIM` entries per sample. Two ways compute the products:

* one pass (:func:`fused_terms`): a velocity that offers ``velocity_and_jacobian_terms`` (the
  package's :class:`~iterflow.core.nn.MLPVelocity`, through its :class:`~iterflow.core.flow.Block`
  and :class:`Reversed`) returns the velocity with its divergence and Jacobian norm, the tangents
  carried forward through its layers (:mod:`iterflow.core.nn.mlp_jacobian`): no autograd graph at
  evaluation, and in training one ordinary backward pass instead of a double backward;
* autograd (every other velocity, e.g. user modules and the U-Net): vector-Jacobian products, one
  batched backward pass or one pass each, as decided (and measured) in
  :func:`iterflow.core.ode.jacobian_terms`.

Both give the same values (to rounding; tested in float64), except Hutchinson's Jacobian-norm
estimate, ``|J eps|^2`` in one pass and ``|eps^T J|^2`` by autograd (equal in expectation).
:func:`autograd_jacobian_terms` forces the autograd path (comparisons, benchmarks).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from iterflow.core.ode import SolverSpec, integrate, jacobian_terms, make_probes
from iterflow.errors import check_choice

EXACT_DIVERGENCE_MAX_DIM = 16  # "auto" uses the exact trace up to this many entries per sample
DIVERGENCES = ("auto", "exact", "hutchinson")
PROBE_KINDS = ("rademacher", "gaussian")

#: A velocity called as ``v(x, s)`` with ``x`` ``(B, *E)`` and ``s`` a 0-dim tensor, returning a
#: tensor shaped like ``x`` (a :class:`~iterflow.core.flow.Block`, or any such callable).
Velocity = Callable[[Tensor, Tensor], Tensor]
#: ``(x, *integrals)``: the integrals asked for, in the order divergence, kinetic, Jacobian.
AugmentedState = tuple[Tensor, ...]
#: ``terms(x, s, probes, frobenius=...) -> (v, div, frob)`` or ``None`` (see :func:`fused_terms`).
FusedTerms = Callable[..., "tuple[Tensor, Tensor, Tensor] | None"]


@dataclass
class PathIntegrals:
    """End point and path integrals of one block (or a chain of blocks, summed), per sample.

    An integral that was not asked for is a tensor of zeros (nothing was computed for it).

    Attributes:
        z: ``(B, *E)`` end point ``x(1)``.
        div: ``(B,)`` ``int_0^1 div v(x(s), s) ds`` (the log-determinant of the map).
        kinetic: ``(B,)`` ``int_0^1 |v(x(s), s)|^2 ds``.
        jacobian: ``(B,)`` ``int_0^1 ||dv/dx||_F^2 ds`` (exact trace) or its Hutchinson estimate
            ``int_0^1 |eps^T dv/dx|^2 ds``.
    """

    z: Tensor
    div: Tensor
    kinetic: Tensor
    jacobian: Tensor


def resolve_divergence(kind: str, dim: int, *, argument: str = "divergence") -> str:
    """The one ``auto`` rule: ``"auto"`` -> ``"exact"`` up to :data:`EXACT_DIVERGENCE_MAX_DIM`
    entries per sample (``dim``), else ``"hutchinson"``; ``"exact"`` and ``"hutchinson"`` unchanged.

    Raises:
        InputError: (naming ``argument``) ``kind`` is not one of :data:`DIVERGENCES`.

    Example:
        >>> resolve_divergence("auto", 2), resolve_divergence("auto", 784)
        ('exact', 'hutchinson')
    """
    check_choice(kind, DIVERGENCES, argument)
    if kind == "auto":
        return "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return kind


def draw_probes(
    x: Tensor, divergence: str, probes: int, probe_kind: str, generator: torch.Generator | None
) -> Tensor | None:
    """Hutchinson probes ``(K, B, *E)`` for ``x``, or ``None`` when the trace is exact.

    Arguments:
        x: ``(B, *E)`` points the probes go with.
        divergence: ``"auto"``, ``"exact"`` or ``"hutchinson"`` (:func:`resolve_divergence`).
        probes: ``K``, the number of probes per sample.
        probe_kind: ``"rademacher"`` or ``"gaussian"``.
        generator: randomness of the probes.
    """
    if resolve_divergence(divergence, x[0].numel()) == "exact":
        return None
    return make_probes(
        tuple(x.shape), probes, kind=probe_kind, generator=generator, dtype=x.dtype, device=x.device
    )


class DataUnits:
    """A block of model units seen in data units: ``dx/ds = scale * v((x - shift) / scale, s)``.

    Integrating it gives ``denormalize(block(normalize(x)))`` (fixed-step solvers commute with the
    affine change of units) and the kinetic energy ``|dx/ds|^2`` in data units.
    """

    def __init__(self, block: Velocity, shift: Tensor, scale: Tensor) -> None:
        self.block, self.shift, self.scale = block, shift, scale

    def __call__(self, x: Tensor, s: Tensor) -> Tensor:  # (B, *E) -> (B, *E)
        scale = self.scale.to(x.dtype)
        return scale * self.block((x - self.shift.to(x.dtype)) / scale, s)


class Reversed:
    """A block run backwards in its own time: ``w(x, s) = -v(x, 1 - s)``.

    Integrating ``w`` over ``s: 0 -> 1`` is integrating ``v`` from ``s = 1`` to ``0`` (the block's
    inverse map; a fixed-step solver takes the same steps in the opposite order), with the same
    kinetic energy ``int |v|^2``, so every integral of :func:`integrate_path` is available backwards.
    """

    def __init__(self, block: Velocity) -> None:
        self.block = block

    def __call__(self, x: Tensor, s: Tensor) -> Tensor:
        return -self.block(x, 1.0 - s)

    def velocity_and_jacobian_terms(
        self, x: Tensor, s: Tensor, probes: Tensor | None = None, *, frobenius: bool = False
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The block's one-pass terms, reversed: ``(-v, -div, frob)`` at ``1 - s`` (or ``None``)."""
        fused = fused_terms(self.block)
        out = None if fused is None else fused(x, 1.0 - s, probes, frobenius=frobenius)
        return None if out is None else (-out[0], -out[1], out[2])


_AUTOGRAD_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "iterflow_autograd_jacobian_terms", default=False
)


@contextmanager
def autograd_jacobian_terms() -> Iterator[None]:
    """Inside the ``with`` body every velocity takes the autograd path of
    :func:`iterflow.core.ode.jacobian_terms` (no one-pass method is used): for comparisons of the
    two paths and benchmarks."""
    token = _AUTOGRAD_ONLY.set(True)
    try:
        yield
    finally:
        _AUTOGRAD_ONLY.reset(token)


def fused_terms(block: Velocity) -> FusedTerms | None:
    """The velocity's one-pass ``(v, div, frob)`` method, if it has one (the capability check).

    A velocity (a :class:`~iterflow.core.flow.Block`, :class:`Reversed`, or a network such as
    :class:`~iterflow.core.nn.MLPVelocity`) that offers ``velocity_and_jacobian_terms(x, s, probes,
    frobenius=...)`` gets the velocity, its divergence and its squared Jacobian norm from it
    (forward-mode tangents, no autograd graph, one ordinary backward in training); the method may
    answer ``None`` for a call it does not cover. Every other velocity, and every velocity inside
    :func:`autograd_jacobian_terms`, takes the autograd path of
    :func:`iterflow.core.ode.jacobian_terms`.
    """
    if _AUTOGRAD_ONLY.get():
        return None
    fused = getattr(block, "velocity_and_jacobian_terms", None)
    return fused if callable(fused) else None


def augmented_field(
    block: Velocity,
    probes: Tensor | None,
    create_graph: bool,
    *,
    divergence: bool = True,
    kinetic: bool = True,
    jacobian: bool = True,
    derivatives: bool = True,
) -> Callable[[Tensor, AugmentedState], AugmentedState]:
    """The vector field of the augmented state ``(x, *integrals)`` (see the module docstring).

    The divergence and the Jacobian norm come from the velocity's one-pass method where it has one
    (:func:`fused_terms`), else from autograd (:func:`iterflow.core.ode.jacobian_terms`).

    Arguments:
        block: the velocity integrated.
        probes: ``(K, B, *E)`` Hutchinson probes held fixed along the path, or ``None`` (exact).
        create_graph: keep the graph so that the integrals can be differentiated (training);
            otherwise every output is detached.
        divergence, kinetic, jacobian: which integrals the state carries after ``x`` (in this
            order); with all three ``False`` the state is ``(x,)``.
        derivatives: ``False`` drops the divergence and the Jacobian norm whatever their flags.

    Returns:
        ``field(t, state) -> d state / dt``.
    """
    want_div, want_jac = divergence and derivatives, jacobian and derivatives
    need_products = want_div or want_jac
    fused = fused_terms(block) if need_products else None

    def field(t: Tensor, state: AugmentedState) -> AugmentedState:
        x = state[0]
        div = frob = None
        terms = None
        if fused is not None:
            with nullcontext() if create_graph else torch.no_grad():
                terms = fused(x, t, probes, frobenius=want_jac)
        if terms is not None:
            v, div, frob = terms
        elif need_products:
            with torch.enable_grad():
                if not x.requires_grad:
                    x = x.detach().requires_grad_(True)
                v = block(x, t)
                div, frob = jacobian_terms(v, x, probes, create_graph=create_graph)
        elif create_graph:
            v = block(x, t)
        else:
            with torch.no_grad():
                v = block(x, t)
        out = [v]
        if want_div:
            out.append(div)  # type: ignore[arg-type]
        if kinetic:
            out.append(v.pow(2).reshape(v.shape[0], -1).sum(1))
        if want_jac:
            out.append(frob)  # type: ignore[arg-type]
        return tuple(out) if create_graph else tuple(o.detach() for o in out)

    return field


def integrate_path(
    block: Velocity,
    x: Tensor,
    spec: SolverSpec,
    *,
    probes: Tensor | None = None,
    create_graph: bool = True,
    divergence: bool = True,
    kinetic: bool = True,
    jacobian: bool = True,
    derivatives: bool = True,
) -> PathIntegrals:
    """Integrate one block over ``s: 0 -> 1`` with the path integrals asked for.

    Arguments:
        block: the block (any :data:`Velocity`).
        x: ``(B, *E)`` start points (model units).
        spec: solver (fixed-step or adaptive; adaptive solvers are differentiated through their
            steps, and their step-size control sees only the integrals asked for).
        probes: ``(K, B, *E)`` Hutchinson probes (:func:`draw_probes`), or ``None`` for the exact
            divergence and Jacobian norm.
        create_graph: differentiable results (training) or detached ones (evaluation).
        divergence, kinetic, jacobian: integrate ``div v``, ``|v|^2``, ``||dv/dx||_F^2``; an
            integral not asked for costs nothing and is returned as zeros.
        derivatives: ``False``: neither the divergence nor the Jacobian norm (end point and
            kinetic energy only, no backward pass), whatever their flags.

    Returns:
        :class:`PathIntegrals` of the block.

    Example:
        >>> from iterflow.core.flow import Block
        >>> from iterflow.core.nn import MLPVelocity
        >>> blk = Block(MLPVelocity(2, hidden=(8,)))
        >>> r = integrate_path(blk, torch.zeros(3, 2), SolverSpec("rk4", 2), create_graph=False)
        >>> r.z.shape, r.div.shape
        (torch.Size([3, 2]), torch.Size([3]))
    """
    want = (divergence and derivatives, kinetic, jacobian and derivatives)
    zero = x.new_zeros(x.shape[0])
    if not any(want):
        return _integrate_state(block, x, spec, create_graph, zero)
    field = augmented_field(
        block,
        probes,
        create_graph,
        divergence=want[0],
        kinetic=want[1],
        jacobian=want[2],
    )
    state0: AugmentedState = (x, *(zero for w in want if w))
    end = cast(AugmentedState, integrate(field, state0, 0.0, 1.0, spec))  # type: ignore[arg-type]
    z, *integrals = end
    values = iter(integrals)
    div, kin, jac = (next(values) if w else zero for w in want)
    return PathIntegrals(z, div, kin, jac)


def _integrate_state(
    block: Velocity, x: Tensor, spec: SolverSpec, create_graph: bool, zero: Tensor
) -> PathIntegrals:
    """The end point alone (no integral asked for)."""

    def field(t: Tensor, y: Tensor) -> Tensor:
        return block(y, t)

    with nullcontext() if create_graph else torch.no_grad():
        z = cast(Tensor, integrate(field, x, 0.0, 1.0, spec))  # type: ignore[arg-type]
    return PathIntegrals(z, zero, zero, zero)


def integrate_chain(
    blocks: Sequence[Velocity],
    x: Tensor,
    spec: SolverSpec,
    *,
    probes: Tensor | None = None,
    create_graph: bool = True,
    divergence: bool = True,
    kinetic: bool = True,
    jacobian: bool = True,
) -> PathIntegrals:
    """:func:`integrate_path` through ``blocks`` in order (the probes shared by every block); the
    end point of the last block and each integral summed over the blocks.

    Example:
        >>> from iterflow.core.flow import Block
        >>> from iterflow.core.nn import MLPVelocity
        >>> chain = [Block(MLPVelocity(2, hidden=(8,))) for _ in range(2)]
        >>> r = integrate_chain(chain, torch.zeros(3, 2), SolverSpec("rk4", 2), kinetic=False)
        >>> r.kinetic
        tensor([0., 0., 0.])
    """
    zero = x.new_zeros(x.shape[0])
    total = PathIntegrals(x, zero, zero, zero)
    for b in blocks:
        r = integrate_path(
            b,
            total.z,
            spec,
            probes=probes,
            create_graph=create_graph,
            divergence=divergence,
            kinetic=kinetic,
            jacobian=jacobian,
        )
        total = PathIntegrals(
            r.z, total.div + r.div, total.kinetic + r.kinetic, total.jacobian + r.jacobian
        )
    return total
