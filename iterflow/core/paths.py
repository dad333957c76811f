"""Interpolants (probability paths) between data ``x0`` (time 0) and a target ``x1`` (time 1).

``x_s = a(s) x0 + b(s) x1`` with ``a(0) = b(1) = 1``, ``a(1) = b(0) = 0``; the flow-matching target
is the time derivative ``dx_s/ds = a'(s) x0 + b'(s) x1`` (Lipman et al. arXiv 2210.02747; Albergo &
Vanden-Eijnden arXiv 2209.15571; Liu et al. arXiv 2209.03003).

iterflow keeps data at ``s = 0``; papers with noise at ``t = 0`` use ``t = 1 - s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.errors import Registry


@dataclass(frozen=True)
class PathSample:
    """A point on the interpolant and its velocity target.

    Attributes:
        s: ``(B,)`` times.
        x: ``(B, *E)`` interpolated points ``x_s``.
        dx: ``(B, *E)`` target velocities ``dx_s/ds``.
    """

    s: Tensor
    x: Tensor
    dx: Tensor


class Interpolant:
    """Base class: subclasses give the coefficients ``a, b`` and their derivatives."""

    name = "base"

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, b, da/ds, db/ds)`` at times ``s``."""
        raise NotImplementedError

    def sample(self, x0: Tensor, x1: Tensor, s: Tensor) -> PathSample:
        """Interpolate between paired ``x0`` and ``x1`` (shape ``(B, *E)``) at times ``s`` (``(B,)``)."""
        a, b, da, db = self.coefficients(s)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a, b, da, db = (c.reshape(shape) for c in (a, b, da, db))
        return PathSample(s=s, x=a * x0 + b * x1, dx=da * x0 + db * x1)


class Straight(Interpolant):
    """Rectified-flow / conditional-OT path ``x_s = (1 - s) x0 + s x1``, ``dx = x1 - x0``."""

    name = "straight"

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        one = torch.ones_like(s)
        return 1 - s, s, -one, one

    def sample(self, x0: Tensor, x1: Tensor, s: Tensor) -> PathSample:
        sb = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        return PathSample(s=s, x=x0 + sb * (x1 - x0), dx=x1 - x0)


class Trigonometric(Interpolant):
    """Variance-preserving path ``x_s = cos(pi s / 2) x0 + sin(pi s / 2) x1``."""

    name = "trig"

    def coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ang = 0.5 * math.pi * s
        c, si = torch.cos(ang), torch.sin(ang)
        return c, si, -0.5 * math.pi * si, 0.5 * math.pi * c


INTERPOLANTS: Registry[type[Interpolant]] = Registry("interpolant")
INTERPOLANTS.register("straight", Straight)
INTERPOLANTS.register("trig", Trigonometric)


def get_interpolant(name: str) -> Interpolant:
    return INTERPOLANTS.get(name, "interpolant")()
