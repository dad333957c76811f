"""Local flow matching: a chain of small flow-matching blocks, each one Ornstein-Uhlenbeck step long
(Xu, Cheng, Xie, "Local Flow Matching Generative Models", arXiv 2410.02548).

Block ``n`` is trained on the current particles ``x_l ~ p_{n-1}`` (the data pushed through blocks
``1..n-1``) to carry them one OU step of length ``h_n`` ahead,

.. math::
    x_r = e^{-h_n} x_l + \\sqrt{1 - e^{-2 h_n}}\\, g, \\qquad g \\sim N(0, I),

by flow matching on the *dependent* pair ``(x_l, x_r)`` (fresh ``g`` and fresh times every step):
``min_v E_s E || v(I_s(x_l, x_r), s) - d/ds I_s(x_l, x_r) ||^2`` with a straight or trigonometric
interpolant ``I_s``. Its minimiser's flow carries ``p_{n-1}`` to ``p_{n-1} * OU(h_n)`` (the OU
transition kernel; METHODS.md section 2, Lemma III.1 of the tutorial), and the trained block pushes
the particles to the next block's source. The OU semigroup contracts ``KL(. || N(0, I))`` (it is the
Wasserstein gradient flow of that KL), so the chain's end approaches ``N(0, I)``; an optional last
block carries what remains to ``N(0, I)`` by plain flow matching with an independent coupling.

Schedule: ``h_n = min(h * h_growth^(n-1), h_max)`` (``h_max = 0``: no cap), or the explicit list
``hs``. All quantities live in the flow's model units (after the run's standardisation).

Per-block figures (:meth:`LocalFlowMatching.stage_report`) show the forward process converging: the
distances of the pushed validation particles to ``N(0, I)``. Every block is invertible, so after the
last block ``KL(p_N || N(0, I)) = KL(p_data || model)`` (METHODS.md section 3): the last
``kl_to_normal`` estimates the model's NLL gap above the data entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.core.couplings import COUPLINGS, pairing_environment
from iterflow.core.flow import Flow
from iterflow.core.paths import INTERPOLANTS
from iterflow.errors import check_positive, fail
from iterflow.methods.base import Loss, Method
from iterflow.methods.fm import FMOptions, TimeOptions, flow_matching_loss

KL_MAX_DIM = 10  # the nearest-neighbour KL estimate is reported up to this dimension
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # kernel widths in units of sqrt(2 d) (normal_bandwidths)
REPORT_SEED = 7919  # seeds the reference N(0, I) draws of the per-block figures


@dataclass(frozen=True)
class LocalFMOptions(TimeOptions):
    """Options of local flow matching.

    Attributes:
        interpolant: ``straight`` or ``trig`` path between ``x_l`` (s = 0) and ``x_r`` (s = 1).
        h: OU step of the first block (model units; OU time of ``dX = -X dt + sqrt(2) dW``).
        h_growth: ratio between consecutive steps (1: constant ``h``; > 1: geometric growth).
        h_max: cap on every step (0: no cap).
        hs: explicit steps, one per OU block (overrides ``h``, ``h_growth``, ``h_max``); given on
            the command line as ``-o hs=0.1,0.2,0.4``.
        final_block: make the last block carry the current particles to ``N(0, I)`` (independent
            coupling by default) instead of taking one more OU step (with one block: plain flow
            matching).

    The default schedule ``h_n = 0.01 * 4^(n-1)`` roughly doubles the OU blur
    ``sqrt(1 - e^{-2 T_n})`` (``T_n = h_1 + ... + h_n``) from block to block, so that each block bridges
    two distributions of similar resolution; data with finer structure want a smaller ``h`` (the
    tree recipe of ``benchmarks/bench_local_fm.py`` uses ``h = 0.002``).
        final_coupling: coupling of that last block: ``independent``, ``ot`` or ``sinkhorn``.
        report_n: validation particles (and fresh normal samples) used for the per-block distances
            to ``N(0, I)``.
        time_*: the density of every block's training times (:class:`~iterflow.methods.fm.TimeOptions`,
            as flow matching's; default uniform). Any such density keeps each block's minimiser;
            ``power`` leans to the block's data end.
    """

    interpolant: str = "straight"
    h: float = 0.01
    h_growth: float = 4.0
    h_max: float = 0.0
    hs: tuple[float, ...] = ()
    final_block: bool = True
    final_coupling: str = "independent"
    report_n: int = 2000

    def fm_options(self, coupling: str = "independent") -> FMOptions:
        """The flow-matching options of a block (its interpolant, coupling and time density)."""
        return FMOptions(interpolant=self.interpolant, coupling=coupling, **self.time_fields())

    def __post_init__(self) -> None:
        INTERPOLANTS.get(self.interpolant, "interpolant")
        COUPLINGS.get(self.final_coupling, "final_coupling")
        check_positive(self.h, "h")
        check_positive(self.h_growth, "h_growth")
        check_positive(self.h_max, "h_max", allow_zero=True)
        check_positive(self.report_n, "report_n", integer=True)
        for v in self.hs:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                fail("hs", "must list finite OU steps > 0", self.hs)
        super().__post_init__()

    def step(self, n: int) -> float:
        """OU step ``h_n`` of block ``n`` (0-based) from the schedule."""
        if self.hs:
            if n >= len(self.hs):
                fail("hs", f"must list a step for every OU block (block {n + 1} has none)", self.hs)
            return float(self.hs[n])
        h = self.h * self.h_growth**n
        return min(h, self.h_max) if self.h_max > 0 else h


def ou_step(x: Tensor, h: float, noise: Tensor) -> Tensor:
    """One exact Ornstein-Uhlenbeck transition: ``e^{-h} x + sqrt(1 - e^{-2h}) noise``.

    Arguments:
        x: ``(B, *E)`` starting points.
        h: step length (> 0).
        noise: ``(B, *E)`` standard normal draws.

    Returns:
        ``(B, *E)`` points distributed as ``X_h`` given ``X_0 = x``. For ``x ~ N(m, S)``:
        ``N(e^{-h} m, e^{-2h} S + (1 - e^{-2h}) I)``.
    """
    a = math.exp(-h)
    return a * x + math.sqrt(-math.expm1(-2.0 * h)) * noise


def normal_bandwidths(d: int) -> list[float]:
    """Fixed MMD kernel widths ``sqrt(2 d) * (1/4, 1/2, 1, 2, 4)``.

    ``sqrt(2 d)`` is the typical distance between two draws of ``N(0, I_d)``; fixing the widths
    (instead of the data-dependent median heuristic) makes the figures of successive blocks
    comparable.
    """
    base = math.sqrt(2.0 * d)
    return [base * s for s in MMD_SCALES]


def distances_to_normal(
    x: Tensor, generator: torch.Generator, prefix: str = ""
) -> dict[str, float]:
    """Distances of the particles ``x`` ``(n, *E)`` to ``N(0, I)``.

    Returns ``mmd_to_normal`` (unbiased squared MMD against ``n`` fresh normal draws, kernel
    widths :func:`normal_bandwidths`), ``gaussian_kl_to_normal`` (KL of the Gaussian fit, blind to
    non-Gaussian structure) and, for dimension ``<= 10``, ``kl_to_normal`` (nearest-neighbour KL
    estimate), each key prefixed by ``prefix``.
    """
    from iterflow.metrics import gaussian_kl_to_standard, kl_to_standard_normal, mmd

    xf = x.detach().flatten(1).double().cpu()
    d = xf.shape[1]
    z = torch.randn(xf.shape, generator=generator, dtype=torch.float64)
    out = {
        f"{prefix}mmd_to_normal": mmd(xf, z, normal_bandwidths(d)),
        f"{prefix}gaussian_kl_to_normal": gaussian_kl_to_standard(xf),
    }
    if d <= KL_MAX_DIM:
        out[f"{prefix}kl_to_normal"] = kl_to_standard_normal(xf)
    return out


class LocalFlowMatching(Method):
    """Local flow matching: each block flow-matches particles one OU step ahead (arXiv 2410.02548).

    Example:
        >>> from iterflow.train import TrainConfig, train  # doctest: +SKIP
        >>> cfg = TrainConfig(method="local-fm", data="tree", blocks=6,  # doctest: +SKIP
        ...                   activation="relu", options={"h": 0.002, "h_growth": 4.0})
        >>> flow = train(cfg, "runs/lfm").flow  # doctest: +SKIP
    """

    name = "local-fm"
    Options = LocalFMOptions
    progressive = True
    # the tree recipe of benchmarks/bench_local_fm.py (test NLL 2.474 in 91 s on one CPU thread)
    recommended = {
        "blocks": 6,
        "steps": 3000,
        "batch_size": 4096,
        "lr": 2e-3,
        "hidden": (128, 128, 128),
        "activation": "relu",
        "n_train": 100_000,
        "options": {"h": 0.002, "h_growth": 4.0, "final_block": True, "push_steps": 8},
    }
    # bf16 autocast of the training forward passes (``TrainConfig.autocast="auto"``) measured on the
    # tree recipe of benchmarks/bench_local_fm.py: test NLL 2.591 against 2.575 in float32 (standard
    # error 0.015) at half the CPU time.
    autocast_safe = True

    def __init__(
        self, options: LocalFMOptions, *, event_shape: tuple[int, ...], num_blocks: int
    ) -> None:
        super().__init__(options, event_shape=event_shape, num_blocks=num_blocks)
        self.options: LocalFMOptions = options
        n_ou = num_blocks - int(options.final_block)
        if options.hs and len(options.hs) < n_ou:
            fail(
                "hs",
                f"must list {n_ou} OU steps for {num_blocks} blocks"
                f"{' (the last is the final block)' if options.final_block else ''}",
                options.hs,
            )
        self._ou = options.fm_options()
        self._final = options.fm_options(options.final_coupling)

    def environment(self) -> dict[str, str]:
        """The final block's OT pairing implementation where it is coupled by ``ot``
        (:func:`iterflow.core.couplings.pairing_environment`)."""
        if not self.options.final_block:
            return {}
        o = self._final
        dim = math.prod(self.event_shape)
        return pairing_environment(o.coupling, dim, o.ot_solver, o.ot_chunk, o.ot_refine)

    def is_final(self, index: int) -> bool:
        """Whether block ``index`` (0-based) is the final block, carrying particles to N(0, I)."""
        return self.options.final_block and index == self.num_blocks - 1

    def step_size(self, index: int) -> float | None:
        """OU step ``h`` of block ``index``, or ``None`` for the final block."""
        return None if self.is_final(index) else self.options.step(index)

    def ou_time(self, index: int) -> float:
        """OU time ``sum_{m <= index} h_m`` of blocks ``0..index`` (the final block excluded)."""
        return sum(self.options.step(m) for m in range(index + 1) if not self.is_final(m))

    def targets(self, x_l: Tensor, index: int, generator: torch.Generator) -> Tensor:
        """Right ends ``x_r`` of left ends ``x_l`` ``(B, *E)``: one OU step ahead, or N(0, I)."""
        g = torch.randn(x_l.shape, generator=generator, device=x_l.device, dtype=x_l.dtype)
        h = self.step_size(index)
        return g if h is None else ou_step(x_l, h, g)

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        x_l = batch[0]
        x_r = self.targets(x_l, index, generator)
        opts = self._final if self.is_final(index) else self._ou
        return flow_matching_loss(stage.blocks[0], x_l, x_r, opts, generator)  # type: ignore[arg-type]

    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        """Per-block figures: the step, how well the block did its job, the distance to ``N(0, I)``.

        ``local_mmd`` is the squared MMD between the pushed particles and the exact target of the
        block (one OU step of ``before``, or ``N(0, I)`` for the final block). The distances to
        ``N(0, I)`` (:func:`distances_to_normal`) of the data are added to the first block's record
        with the prefix ``data_``. The N(0, I) reference sample is the same for every block (common
        random numbers: differences between blocks reflect the particles, not the reference).
        """
        n = min(self.options.report_n, before.shape[0])
        if n < 2:
            return {}
        b, a = before[:n].detach().double().cpu(), after[:n].detach().double().cpu()
        out: dict[str, float] = {}
        if index == 0:
            out.update(distances_to_normal(b, torch.Generator().manual_seed(REPORT_SEED), "data_"))
        from iterflow.metrics import mmd

        target = self.targets(b, index, torch.Generator().manual_seed(REPORT_SEED + 1 + index))
        out["local_mmd"] = mmd(a.flatten(1), target.flatten(1), normal_bandwidths(a[0].numel()))
        h = self.step_size(index)
        if h is not None:
            out["h"] = h
            out["ou_time"] = self.ou_time(index)
        out.update(distances_to_normal(a, torch.Generator().manual_seed(REPORT_SEED)))
        return out
