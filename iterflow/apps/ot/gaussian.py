r"""Closed forms of optimal transport between Gaussians, for tests, benchmarks and sanity checks.

Between ``N(m1, S1)`` and ``N(m2, S2)`` the optimal map is linear, ``T(x) = m2 + A (x - m1)`` with
``A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}``, and
``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})`` (Dowson & Landau 1982;
Peyre & Cuturi, "Computational optimal transport", Remark 2.31).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from iterflow.core.flow import Block, Flow
from iterflow.errors import check_positive, fail


def sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_w2_sq(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> float:
    r"""``W_2^2(N(m1, S1), N(m2, S2)) = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2
    S1^{1/2})^{1/2})``."""
    r1 = sqrtm_psd(s1.double())
    cross = sqrtm_psd(r1 @ s2.double() @ r1)
    return float(
        (m1 - m2).double().pow(2).sum() + torch.trace(s1.double() + s2.double() - 2 * cross)
    )


def gaussian_ot_map(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    r"""The optimal map ``T(x) = m2 + A (x - m1)`` from ``N(m1, S1)`` to ``N(m2, S2)``.

    ``A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}`` (symmetric positive definite).

    Returns:
        ``(A, b)`` with ``T(x) = x @ A.T + b`` in float64.
    """
    r1 = sqrtm_psd(s1.double())
    r1_inv = torch.linalg.inv(r1)
    a = r1_inv @ sqrtm_psd(r1 @ s2.double() @ r1) @ r1_inv
    return a, m2.double() - a @ m1.double()


class GaussianOTVelocity(nn.Module):
    r"""Velocity of the exact OT (displacement) interpolation between two Gaussians, for one block.

    With the optimal map ``T(x) = A x + c`` (:func:`gaussian_ot_map`), particles move on straight
    lines at constant speed, ``x_t = x_0 + t ((A - I) x_0 + c)``, so at global time ``t`` the
    velocity is ``(A - I) x_0 + c`` with ``x_0 = (I + t (A - I))^{-1} (x_t - t c)``. Block ``index``
    of ``blocks`` covers ``t = (index + s) / blocks``, hence the velocity in block time is that
    divided by ``blocks``. A closed-form reference flow for tests and benchmarks (its ``config()``
    names the kind ``gaussian-ot``; it is not in the network registry: build it directly).

    Arguments:
        dim: dimension.
        index, blocks: which block of how many.
        a, c: ``(d, d)`` and ``(d,)``; default identity and zero (the identity flow).
    """

    a: Tensor
    c: Tensor

    def __init__(
        self,
        dim: int,
        index: int = 0,
        blocks: int = 1,
        a: Tensor | None = None,
        c: Tensor | None = None,
    ) -> None:
        super().__init__()
        check_positive(dim, "dim", integer=True)
        check_positive(blocks, "blocks", integer=True)
        if not 0 <= index < blocks:
            fail("index", f"must be in [0, {blocks})", index)
        self.dim, self.index, self.blocks = dim, index, blocks
        self.register_buffer("a", torch.eye(dim) if a is None else a.detach().clone())
        self.register_buffer("c", torch.zeros(dim) if c is None else c.detach().clone())

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        t = (self.index + torch.as_tensor(s, dtype=x.dtype, device=x.device)) / self.blocks
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        am, c = self.a.to(x) - eye, self.c.to(x)
        t = t.reshape(-1, 1, 1) if t.ndim else t  # (B, 1, 1) for per-sample times
        m = eye + t * am  # (d, d) or (B, d, d)
        rhs = (x - t.reshape(-1, 1) * c if t.ndim else x - t * c)[..., None]  # (B, d, 1)
        x0 = torch.linalg.solve(m, rhs)[..., 0]
        return (x0 @ am.T + c) / self.blocks

    def config(self) -> dict[str, Any]:
        return {"kind": "gaussian-ot", "dim": self.dim, "index": self.index, "blocks": self.blocks}


def gaussian_ot_flow(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, blocks: int = 1) -> Flow:
    """The exact optimal-transport flow from ``N(m1, S1)`` to ``N(m2, S2)`` (float64, identity
    normalisation): ``encode`` is the optimal map, every path a straight constant-speed line, and
    the kinetic energy of a particle equals its squared displacement."""
    a, c = gaussian_ot_map(m1, s1, m2, s2)
    d = a.shape[0]
    blks = [Block(GaussianOTVelocity(d, n, blocks, a, c)) for n in range(blocks)]
    return Flow(blks, (d,)).double()
