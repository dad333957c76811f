"""A velocity network run through ``torch.compile``, its one-pass Jacobian terms included.

``torch.compile(net)`` compiles ``forward`` only: attribute access on the compiled module reaches the
original, so the one-pass ``velocity_and_jacobian_terms`` of :class:`~iterflow.core.nn.MLPVelocity`
(the integrand of CNF and JKO-flow losses; :mod:`iterflow.core.nn.mlp_jacobian`) would stay eager.
:class:`CompiledVelocity` compiles both. The gain is in objectives made of many small operations:
TorchInductor fuses the activations, their derivatives and the tangents' elementwise products into a
few generated loops (on a CPU) and removes most per-operation dispatch. Measured
(``benchmarks/bench_speed.py``, section ``likelihood``) on the CNF and JKO-flow rose recipes.

Compilation takes seconds per input shape (cached on disk by Inductor for later processes); the
wrapper shares its parameters with the network, which is what gets saved. Shapes are compiled
statically: a training loop sees one batch shape.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _terms(
    net: nn.Module,
    x: Tensor,
    t: Tensor | float,
    probes: Tensor | None,
    frobenius: bool,
    y: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    return net.velocity_and_jacobian_terms(x, t, probes, frobenius=frobenius, y=y)  # type: ignore[operator]


class CompiledVelocity(nn.Module):
    """``net`` with ``forward`` and (where ``net`` has it) ``velocity_and_jacobian_terms`` compiled.

    Arguments:
        net: a velocity network ``net(x, t, **cond)``.
        options: keyword arguments of ``torch.compile`` (default ``dynamic=False``).
    """

    def __init__(self, net: nn.Module, **options: Any) -> None:
        super().__init__()
        self.net = net
        opts = {"dynamic": False, **options}
        self._forward = torch.compile(net, **opts)
        self._terms = (
            torch.compile(_terms, **opts)
            if callable(getattr(net, "velocity_and_jacobian_terms", None))
            else None
        )
        if self._terms is None:  # no one-pass method: the integrand takes the autograd path
            self.velocity_and_jacobian_terms = None  # type: ignore[assignment,method-assign]

    def forward(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        return self._forward(x, t, **cond)

    def velocity_and_jacobian_terms(  # type: ignore[no-redef]
        self,
        x: Tensor,
        t: Tensor | float,
        probes: Tensor | None = None,
        *,
        frobenius: bool = False,
        y: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The network's one-pass ``(v, div, frob)``, compiled."""
        assert self._terms is not None
        if not isinstance(t, Tensor):  # a Python float would be baked into the graph
            t = torch.tensor(t, dtype=x.dtype, device=x.device)
        return self._terms(self.net, x, t, probes, frobenius, y)
