r"""The maps and costs of a transport flow, in data units.

In model units the forward map ``P -> Q`` is ``flow.encode`` and the backward map is ``flow.decode``;
in data units they are :class:`TransportMap` ``forward = denormalize o encode`` and
``backward = decode o normalize``. The flow's normalisation ``u = (x - shift) / scale`` uses the
pooled mean and *one* scale (:func:`transport_normalization`): an isotropic scaling maps optimal
transport maps to optimal transport maps, a per-dimension one would not.

**Reported cost.** :func:`kinetic_energy` integrates ``|v|^2`` in data units along ``rk4``
trajectories with the one augmented integrand of the ODE layer (kinetic integral only, through
:class:`iterflow.core.integrand.DataUnits`, and :class:`~iterflow.core.integrand.Reversed` for the
backward side); the paths end at the maps' images, so one integration per side gives the cost and
the displacements.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from iterflow.apps.ot.samples import check_points
from iterflow.core.flow import Flow
from iterflow.core.integrand import DataUnits, Reversed, integrate_chain
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_choice, check_positive
from iterflow.methods.transport import blocks_of


def transport_normalization(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``shift``: pooled mean ``(d,)``; ``scale``: the pooled RMS standard deviation, one number
    repeated ``d`` times (isotropic, so optimal maps stay optimal)."""
    both = torch.cat([source, target])
    shift = both.mean(0)
    scale = both.var(0).mean().sqrt().clamp_min(1e-6)
    return shift, scale.expand_as(shift).clone()


@dataclass(frozen=True, eq=False)
class TransportMap:
    """One direction of a transport flow, in data units: ``forward`` (``P -> Q``) or ``backward``.

    Calling it integrates every block with ``solver`` (no gradients), in chunks of ``chunk`` rows.
    """

    flow: Flow
    direction: str
    solver: SolverSpec
    chunk: int = 8192

    def __post_init__(self) -> None:
        check_choice(self.direction, ("forward", "backward"), "direction")

    def __call__(self, x: Tensor) -> Tensor:
        x = check_points(x, "x", self.flow.dim)
        with torch.no_grad():
            return torch.cat([self._map(c) for c in x.split(self.chunk)])

    def _map(self, x: Tensor) -> Tensor:
        f = self.flow
        if self.direction == "forward":
            return f.denormalize(f.encode(x, solver=self.solver))
        return f.decode(f.normalize(x), solver=self.solver)


@dataclass(frozen=True)
class TransportCost:
    """Transport costs of a flow, in data units (squared distances).

    Attributes:
        w2_sq: the ``W_2^2`` estimate, the mean of the two kinetic energies.
        kinetic_forward: ``int E_P |v|^2 dt`` along source particles pushed forward.
        kinetic_backward: the same along target particles pulled back.
        displacement_forward: ``E_P |T(x) - x|^2`` (the cost of the coupling ``(x, T x)``).
        displacement_backward: ``E_Q |T^{-1}(y) - y|^2``.
    """

    w2_sq: float
    kinetic_forward: float
    kinetic_backward: float
    displacement_forward: float
    displacement_backward: float


@torch.no_grad()
def kinetic_energy(flow: Flow, x: Tensor, *, direction: str = "forward", steps: int = 16) -> Tensor:
    r"""``int_0^1 |v(x(t), t)|^2 dt`` per particle in data units, shape ``(n,)``.

    Integrates every block with ``steps`` ``rk4`` steps from ``x`` (``P`` side for ``"forward"``,
    ``Q`` side for ``"backward"``) together with ``|scale * v_n(x(s), s)|^2`` (the augmented
    integrand); block ``n`` contributes ``B int_0^1 |.|^2 ds``.
    """
    check_choice(direction, ("forward", "backward"), "direction")
    check_positive(steps, "steps", integer=True)
    x = check_points(x, "x", flow.dim)
    return _kinetic_and_end(flow, x, direction == "backward", steps)[0]


def _kinetic_and_end(flow: Flow, x: Tensor, reverse: bool, steps: int) -> tuple[Tensor, Tensor]:
    """:func:`kinetic_energy` of checked points ``x`` and where their paths end, in data units
    (the forward map of ``x``, or the backward map when ``reverse``: the same ``rk4`` integration
    as :class:`TransportMap` with ``steps`` steps)."""
    shift, scale = cast(Tensor, flow.shift), cast(Tensor, flow.scale)
    blocks = [
        DataUnits(Reversed(b) if reverse else b, shift, scale)
        for b in blocks_of(flow, reverse=reverse)
    ]
    r = integrate_chain(
        blocks, x, SolverSpec("rk4", steps), create_graph=False, divergence=False, jacobian=False
    )
    return flow.num_blocks * r.kinetic, r.z


def transport_cost(flow: Flow, source: Tensor, target: Tensor, *, steps: int = 16) -> TransportCost:
    """Kinetic energies and displacements of ``flow`` on samples of ``P`` and ``Q`` (data units)."""
    check_positive(steps, "steps", integer=True)
    source = check_points(source, "x", flow.dim)
    target = check_points(target, "x", flow.dim)
    # the kinetic-energy paths end at the maps' images: one integration per side gives both
    kf, fwd = _kinetic_and_end(flow, source, False, steps)
    kb, bwd = _kinetic_and_end(flow, target, True, steps)
    return TransportCost(
        w2_sq=float(0.5 * (kf.mean() + kb.mean())),
        kinetic_forward=float(kf.mean()),
        kinetic_backward=float(kb.mean()),
        displacement_forward=float((fwd - source).pow(2).sum(1).mean()),
        displacement_backward=float((bwd - target).pow(2).sum(1).mean()),
    )
