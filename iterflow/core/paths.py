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

from iterflow.errors import Registry, check_choice, check_finite, check_positive, fail


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


#: Densities of the training times of flow matching (:class:`TimeSampler`).
TIME_SAMPLINGS = ("uniform", "logit-normal", "power")
#: How the per-row losses are weighted for the time density (:class:`TimeSampler`).
TIME_WEIGHTINGS = ("none", "importance")


@dataclass(frozen=True)
class TimeSampler:
    """The density ``p(s)`` on ``(0, 1)`` from which flow matching draws its training times.

    * ``uniform``: ``p(s) = 1``.
    * ``logit-normal`` (Esser et al. 2024, arXiv 2403.03206, in iterflow's time, data at ``s = 0``):
      ``s = sigmoid(loc + scale z)``, ``z ~ N(0, 1)``;
      ``p(s) = exp(-(logit(s) - loc)^2 / (2 scale^2)) / (scale sqrt(2 pi) s (1 - s))``.
      ``loc < 0`` puts the mass toward the data end.
    * ``power``: ``s = u^k`` with ``u ~ U(0, 1)`` and ``k = power``, i.e. ``Beta(1/k, 1)``:
      ``p(s) = s^(1/k - 1) / k``; ``k > 1`` leans toward the data end ``s = 0``, where the velocity
      of a density with sharp edges changes fastest.

    ``mix = m > 0`` draws each row's time from ``uniform`` with probability ``m`` and from ``kind``
    otherwise: ``p_m(s) = m + (1 - m) p(s)``. A floor under the density keeps some training at every
    time (a power density alone starves the noise end, where a small network then spreads too wide),
    and it bounds the importance weights by ``1 / m``.

    Every such density with full support on ``(0, 1)`` keeps the pointwise minimiser of the
    flow-matching loss, ``v*(x, s) = E[dx_s/ds | x_s = x]``; it only moves the network's capacity and
    the gradient noise between times. With ``weighting = "importance"`` each row is weighted by
    ``1 / p(s)``, so that the expected loss (and gradient) equals the uniform-time loss exactly
    (``power`` only: its weights ``k s^(1 - 1/k)`` are bounded for ``k >= 1``; the logit-normal's
    ``1 / p`` is not integrable in square, so that combination is refused).

    Attributes:
        kind: one of :data:`TIME_SAMPLINGS`.
        loc, scale: the logit-normal's mean and standard deviation (of ``logit(s)``).
        power: the exponent ``k`` of ``power``.
        mix: the fraction ``m`` in ``[0, 1)`` of uniform times mixed in.
        weighting: one of :data:`TIME_WEIGHTINGS`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s, w = TimeSampler("power", power=2.0).sample(4, g, torch.device("cpu"), torch.float64)
        >>> bool(((s > 0) & (s < 1)).all()), w is None
        (True, True)
    """

    kind: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    power: float = 1.0
    weighting: str = "none"
    mix: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.kind, TIME_SAMPLINGS, "time_sampling")
        check_choice(self.weighting, TIME_WEIGHTINGS, "time_weighting")
        check_finite(self.loc, "time_loc")
        check_positive(self.scale, "time_scale")
        check_positive(self.power, "time_power")
        check_finite(self.mix, "time_mix")
        if not 0.0 <= self.mix < 1.0:
            fail("time_mix", "must be in [0, 1)", self.mix)
        if self.weighting == "importance" and self.kind == "logit-normal" and self.mix == 0.0:
            # 1 / p(s) grows faster than any power of 1 / s at the ends: the weighted loss would
            # have infinite variance
            fail(
                "time_weighting",
                "'importance' needs time_sampling 'uniform' or 'power', or time_mix > 0",
                "logit-normal",
            )

    def sample(
        self, n: int, generator: torch.Generator, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """``n`` times ``s ~ p`` ``(n,)`` and the rows' loss weights (``(n,)``, or ``None`` for
        unweighted), drawn with ``generator`` only."""
        if self.kind == "logit-normal":
            z = torch.randn(n, generator=generator, device=device, dtype=dtype)
            s = torch.sigmoid(self.loc + self.scale * z)
        else:
            s = torch.rand(n, generator=generator, device=device, dtype=dtype)
            if self.kind == "power":
                s = s.pow(self.power)
        if self.mix > 0.0 and self.kind != "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=dtype)
            pick = torch.rand(n, generator=generator, device=device, dtype=dtype) < self.mix
            s = torch.where(pick, u, s)
        # keep s inside (0, 1) where float rounding would reach an end of a density that vanishes or
        # diverges there
        eps = torch.finfo(dtype).eps
        s = s.clamp(eps, 1 - eps) if self.kind != "uniform" else s
        if self.weighting == "none" or self.kind == "uniform":
            return s, None
        return s, 1.0 / self.density(s)

    def density(self, s: Tensor) -> Tensor:
        """``p(s)`` at times ``s`` in ``(0, 1)`` (same shape)."""
        if self.kind == "uniform":
            return torch.ones_like(s)
        if self.kind == "power":
            k = self.power
            p = s.pow(1.0 / k - 1.0) / k
        else:
            u = (torch.logit(s) - self.loc) / self.scale
            p = torch.exp(-0.5 * u * u) / (self.scale * math.sqrt(2 * math.pi) * s * (1 - s))
        return p if self.mix == 0.0 else self.mix + (1.0 - self.mix) * p
