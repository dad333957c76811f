"""Seeded, vectorised 2-D toy distributions (FFJORD's ``toy_data`` plus a fractal tree).

Scales follow FFJORD's ``inf_train_gen`` (Grathwohl et al., 2019, arXiv:1810.01367). Where FFJORD
draws fixed, evenly spaced class counts or angles, the draws here are i.i.d. (uniform component and
angle), which is the distribution those batches approximate. Exact densities are given where they
exist in closed form: the checkerboard (uniform), ``rings`` and ``circles`` (Gaussian-blurred
circles, via the Bessel function :math:`I_0`) and ``fractal-tree`` (Gaussian-blurred segments,
via :math:`\\Phi`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from iterflow.data.base import Dataset, GeneratedDataset, sample_categorical

Sampler = Callable[[int, torch.Generator], torch.Tensor]
#: A sampler that also returns each point's class: ``(n, 2)`` points and ``(n,)`` int64 labels.
LabelledSampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)


def _rand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=_F64)


def _randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=_F64)


def _coin(n: int, g: torch.Generator) -> torch.Tensor:
    """``(n,)`` float64 tensor of i.i.d. fair 0/1 draws."""
    return torch.randint(0, 2, (n,), generator=g).to(_F64)


# --------------------------------------------------------------------------- sampler-only sets


def sample_moons(n: int, g: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles (sklearn ``make_moons``, noise 0.1), then ``2x - (1, 0.2)``."""
    return labelled_moons(n, g)[0]


def labelled_moons(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_moons` with each point's moon (0: upper, 1: lower), the same draws."""
    theta = math.pi * _rand(n, g)
    lower = _coin(n, g)  # 1: the inner (lower) moon
    x = torch.cos(theta) * (1 - 2 * lower) + lower
    y = torch.sin(theta) * (1 - 2 * lower) + 0.5 * lower
    pts = torch.stack([x, y], dim=1) + 0.1 * _randn(n, 2, g=g)
    return 2.0 * pts + torch.tensor([-1.0, -0.2], dtype=_F64), lower.long()


def sample_pinwheel(n: int, g: torch.Generator) -> torch.Tensor:
    """Five curved arms: ``f ~ N((1, 0), diag(0.3^2, 0.1^2))`` turned by ``2 pi c/5 + exp(f_1)/4``.

    The class ``c`` is uniform on ``{0, ..., 4}``; points are finally scaled by 2.
    """
    return labelled_pinwheel(n, g)[0]


def labelled_pinwheel(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_pinwheel` with each point's arm ``c`` in ``{0, ..., 4}``, the same draws."""
    label = torch.randint(0, 5, (n,), generator=g).to(_F64)
    feat = _randn(n, 2, g=g) * torch.tensor([0.3, 0.1], dtype=_F64)
    feat[:, 0] += 1.0
    angle = 2 * math.pi * label / 5 + 0.25 * torch.exp(feat[:, 0])
    c, s = torch.cos(angle), torch.sin(angle)
    x = feat[:, 0] * c + feat[:, 1] * s
    y = -feat[:, 0] * s + feat[:, 1] * c
    return 2.0 * torch.stack([x, y], dim=1), label.long()


def sample_two_spirals(n: int, g: torch.Generator) -> torch.Tensor:
    """Two mirrored spirals: ``t = 3 pi sqrt(u)``, arm ``(-t cos t, t sin t) + U(0, 0.5)^2``.

    Each point takes one arm or its mirror image, is divided by 3 and gets Gaussian noise 0.1.
    """
    return labelled_two_spirals(n, g)[0]


def labelled_two_spirals(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_two_spirals` with each point's spiral (0: the arm, 1: its mirror image)."""
    t = torch.sqrt(_rand(n, g)) * 3 * math.pi
    jitter = 0.5 * torch.rand(n, 2, generator=g, dtype=_F64)
    arm = torch.stack([-torch.cos(t) * t, torch.sin(t) * t], dim=1) + jitter
    mirror = _coin(n, g)
    sign = 1 - 2 * mirror
    return sign[:, None] * arm / 3 + 0.1 * _randn(n, 2, g=g), mirror.long()


def sample_swissroll(n: int, g: torch.Generator) -> torch.Tensor:
    """sklearn ``make_swiss_roll`` (noise 1.0) from the side: ``((t cos t, t sin t) + z) / 5``.

    The roll parameter is ``t ~ U(1.5 pi, 4.5 pi)`` and ``z ~ N(0, I)``.
    """
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) + _randn(n, 2, g=g)
    return pts / 5.0


class SamplerDataset(GeneratedDataset):
    """A 2-D distribution known only through its sampler (``log_prob`` is ``None``); with a
    labelled sampler and ``num_classes > 0`` its points come with classes (:meth:`label_splits`)."""

    has_log_prob = False

    def __init__(
        self,
        name: str,
        sampler: Sampler,
        labelled: LabelledSampler | None = None,
        num_classes: int = 0,
    ) -> None:
        self.name, self.dim, self._sampler = name, 2, sampler
        self._labelled, self._classes = labelled, int(num_classes) if labelled else 0

    @property
    def num_classes(self) -> int:
        """Classes of a labelled sampler (0: none)."""
        return self._classes

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self._labelled is not None:
            return self._labelled(n, generator)[0]
        return self._sampler(n, generator)

    def draw_labelled(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._labelled is None:
            return super().draw_labelled(n, generator)
        return self._labelled(n, generator)

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no known density")

    def _exact_entropy(self) -> float | None:
        return None


# --------------------------------------------------------------------------- checkerboard


class Checkerboard(GeneratedDataset):
    """FFJORD's checkerboard scaled by 2: uniform on 8 squares of side 2 in :math:`[-4, 4]^2`.

    A point is in the support iff :math:`|x_1|, |x_2| \\le 4` and
    :math:`\\lfloor x_1/2 \\rfloor + \\lfloor x_2/2 \\rfloor` is even; the density there is
    :math:`1/32` (total area 32), so :math:`H = \\log 32`.
    """

    has_log_prob = True

    def __init__(self) -> None:
        self.name, self.dim = "checkerboard", 2

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x1 = 4 * _rand(n, generator) - 2
        x2 = _rand(n, generator) - 2 * _coin(n, generator) + torch.floor(x1) % 2
        return 2.0 * torch.stack([x1, x2], dim=1)

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        cell = torch.floor(x.to(_F64) / 2).clamp(-2, 1)  # x = 4 belongs to the last cell
        inside = (x.abs() <= 4).all(dim=1) & (cell.sum(dim=1) % 2 == 0)
        out = torch.full(inside.shape, -math.inf, dtype=_F64, device=x.device)
        return out.masked_fill(inside, -math.log(32.0))

    def _exact_entropy(self) -> float | None:
        return math.log(32.0)


# --------------------------------------------------------------------------- rings


class RingMixture(GeneratedDataset):
    """Mixture of blurred circles: :math:`x = r_k (\\cos\\theta, \\sin\\theta) + \\sigma z`.

    With :math:`\\theta \\sim U(0, 2\\pi)` the component density is exact,
    :math:`\\log p_k(x) = -\\log(2\\pi\\sigma^2) - \\frac{(\\lVert x\\rVert - r_k)^2}{2\\sigma^2}
    + \\log \\operatorname{i0e}(\\lVert x\\rVert r_k / \\sigma^2)`, where
    :math:`\\operatorname{i0e}(z) = e^{-z} I_0(z)` is the scaled modified Bessel function.

    Args:
        name: data set name.
        radii: circle radii :math:`r_k > 0`.
        weights: mixture weights (normalised here).
        noise: isotropic Gaussian standard deviation :math:`\\sigma`.
    """

    has_log_prob = True

    def __init__(self, name: str, radii: list[float], weights: list[float], noise: float) -> None:
        self.name, self.dim, self.noise = name, 2, float(noise)
        self.radii = torch.tensor(radii, dtype=_F64)
        w = torch.tensor(weights, dtype=_F64)
        self.weights = w / w.sum()

    @property
    def num_classes(self) -> int:
        """One class per circle."""
        return int(self.radii.numel())

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.draw_labelled(n, generator)[0]

    def draw_labelled(
        self, n: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Points and their circle ``k``."""
        k = sample_categorical(self.weights, n, generator)
        theta = 2 * math.pi * _rand(n, generator)
        circle = self.radii[k, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        return circle + self.noise * _randn(n, 2, g=generator), k

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        rho = torch.linalg.vector_norm(x.to(_F64), dim=1)[:, None]  # (n, 1)
        r, s2 = self.radii.to(x.device), self.noise**2
        comp = -((rho - r) ** 2) / (2 * s2) + torch.log(torch.special.i0e(rho * r / s2))  # (n, K)
        comp = comp + torch.log(self.weights.to(x.device)) - math.log(2 * math.pi * s2)
        return torch.logsumexp(comp, dim=1)

    def _exact_entropy(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Generator summary plus radii and noise."""
        return {**super().describe(), "radii": self.radii.tolist(), "noise": self.noise}


# --------------------------------------------------------------------------- fractal tree


def tree_segments(
    depth: int = 7, angle: float = math.radians(25.0), ratio: float = 0.7, trunk: float = 2.2
) -> torch.Tensor:
    """Segments of a symmetric binary tree, ``(2^depth - 1, 2, 2)`` as (start, end) points.

    The trunk grows up from :math:`(0, -4)`; each branch ends in two children turned by
    :math:`\\pm` ``angle`` and ``ratio`` times as long. The tree is then centred vertically in
    :math:`[-4, 4]`.
    """
    start = torch.tensor([[0.0, -4.0]], dtype=_F64)
    heading = torch.tensor([math.pi / 2], dtype=_F64)
    length, levels = trunk, []
    for _ in range(depth):  # one step per level, vectorised over the 2^level branches
        end = start + length * torch.stack([torch.cos(heading), torch.sin(heading)], dim=1)
        levels.append(torch.stack([start, end], dim=1))
        start = end.repeat_interleave(2, dim=0)
        heading = (heading[:, None] + torch.tensor([angle, -angle], dtype=_F64)).reshape(-1)
        length *= ratio
    segs = torch.cat(levels)
    top, bottom = segs[..., 1].max(), segs[..., 1].min()
    return segs - torch.tensor([0.0, float(top + bottom) / 2], dtype=_F64)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stable :math:`\\log(\\Phi(b) - \\Phi(a))` for :math:`a \\le b` (elementwise)."""
    flip = a > 0  # both in the right tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    d = log_lo - log_hi  # <= 0
    log1mexp = torch.where(
        d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d))
    )
    return log_hi + log1mexp


class SegmentMixture(GeneratedDataset):
    """Uniform points on line segments plus isotropic Gaussian noise (the ``fractal-tree`` set).

    A segment is picked with probability proportional to its length :math:`L_k`; with
    :math:`u_k, v_k` the coordinates of :math:`x` along and across segment :math:`k` (origin at its
    start), the density is exact:
    :math:`p(x) = \\frac{1}{\\sum_k L_k} \\sum_k [\\Phi(u_k/\\sigma) - \\Phi((u_k - L_k)/\\sigma)]
    \\, \\mathcal N(v_k; 0, \\sigma^2)`.

    Args:
        name: data set name.
        segments: ``(K, 2, 2)`` start and end points (lengths > 0).
        noise: Gaussian standard deviation :math:`\\sigma`.
    """

    has_log_prob = True

    def __init__(self, name: str, segments: torch.Tensor, noise: float) -> None:
        self.name, self.dim, self.noise = name, 2, float(noise)
        self.start = segments[:, 0].to(_F64)  # (K, 2)
        delta = segments[:, 1].to(_F64) - self.start
        self.length = torch.linalg.vector_norm(delta, dim=1)  # (K,)
        self.direction = delta / self.length[:, None]  # (K, 2) unit vectors

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        k = sample_categorical(self.length, n, generator)
        t = self.length[k] * _rand(n, generator)
        return (
            self.start[k] + t[:, None] * self.direction[k] + self.noise * _randn(n, 2, g=generator)
        )

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        rel = x.to(_F64)[:, None, :] - self.start.to(x.device)  # (n, K, 2)
        e = self.direction.to(x.device)
        u = (rel * e).sum(-1)  # (n, K) along the segment
        v = rel[..., 0] * e[:, 1] - rel[..., 1] * e[:, 0]  # (n, K) across it
        s, length = self.noise, self.length.to(x.device)
        along = _log_ndtr_diff((u - length) / s, u / s)
        across = -0.5 * (v / s) ** 2 - math.log(s) - 0.5 * _LOG_2PI
        return torch.logsumexp(along + across, dim=1) - torch.log(length.sum())

    def _exact_entropy(self) -> float | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Generator summary plus the number of segments and noise."""
        return {**super().describe(), "n_segments": int(self.length.numel()), "noise": self.noise}


# --------------------------------------------------------------------------- registry entries


def _sampler_factory(
    name: str, sampler: Sampler, labelled: LabelledSampler | None = None, num_classes: int = 0
) -> Callable[[], Dataset]:
    def factory() -> Dataset:
        return SamplerDataset(name, sampler, labelled, num_classes)

    return factory


def rings() -> RingMixture:
    """FFJORD's ``rings``: radii 3, 2.25, 1.5, 0.75 with equal weights, noise 0.08."""
    return RingMixture("rings", [3.0, 2.25, 1.5, 0.75], [1.0, 1.0, 1.0, 1.0], 0.08)


def circles() -> RingMixture:
    """FFJORD's ``circles`` (sklearn ``make_circles(factor=0.5, noise=0.08)`` times 3)."""
    return RingMixture("circles", [3.0, 1.5], [1.0, 1.0], 0.24)


def fractal_tree() -> SegmentMixture:
    """A depth-7 binary tree (branch angle 25 degrees, length ratio 0.7) blurred with noise 0.05."""
    return SegmentMixture("fractal-tree", tree_segments(), 0.05)


TOY_FACTORIES: dict[str, Callable[[], Dataset]] = {
    "checkerboard": Checkerboard,
    "moons": _sampler_factory("moons", sample_moons, labelled_moons, 2),
    "pinwheel": _sampler_factory("pinwheel", sample_pinwheel, labelled_pinwheel, 5),
    "2spirals": _sampler_factory("2spirals", sample_two_spirals, labelled_two_spirals, 2),
    "swissroll": _sampler_factory("swissroll", sample_swissroll),
    "rings": rings,
    "circles": circles,
    "fractal-tree": fractal_tree,
}
"""Name -> factory of the 2-D toy sets here (registered in :data:`iterflow.data.DATASETS`)."""
