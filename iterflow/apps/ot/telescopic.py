r"""The telescopic density-ratio estimator along a transport flow (Rhodes, Xu & Gutmann 2020,
arXiv 2006.12204; Choi, Meng & Ermon 2022, arXiv 2111.11010; Xu, Cheng & Xie, AISTATS 2025,
arXiv 2305.11857; METHODS.md section 6).


**The telescopic estimator, derived.** For any chain of densities
``rho_0 = p, rho_1, ..., rho_K = q`` that are positive where ``x`` lies, the identity

.. math::
    \log\frac{q(x)}{p(x)} = \sum_{k=0}^{K-1} \log\frac{\rho_{k+1}(x)}{\rho_k(x)}

holds *at the same fixed point* ``x`` (the sum telescopes). Each term is the minimiser of the
logistic loss between samples of ``rho_k`` (label 0) and ``rho_{k+1}`` (label 1), so training
classifiers ``phi_k`` on consecutive pairs and returning ``sum_k phi_k(x)`` is a consistent
estimator whatever the chain is, as long as its *ends* are exactly ``p`` and ``q``. The flow only
decides how easy each classification is: with a flow ``T_t`` carrying ``p`` (``t = 0``) to ``q``
(``t = 1``) and times ``t_k = k / K``, the intermediate members are

.. math::
    \rho_k = \tfrac12 \big( (T_{t_k})_\# p + (T_{t_k} \circ T_1^{-1})_\# q \big), \quad 0 < k < K,

the source particles pushed forward to ``t_k`` mixed with the target particles pulled back to
``t_k`` (``particles="both"``; ``"source"`` or ``"target"`` keep one of the two). Neighbours
overlap, so every classifier sees a well-posed, balanced problem, unlike one classifier between
``p`` and ``q`` whose supports barely meet (the "density chasm" of Rhodes et al.). The ends
``rho_0 = p`` and ``rho_K = q`` are the *samples themselves*, not the flow's images of them, so an
imperfect flow (``T_# p != q``) changes the efficiency but not the consistency of the estimate.

*Evaluation at a point* ``x``: normalise ``u = (x - shift) / scale`` with the flow's normalisation
and return ``sum_{k<K} phi_k(u)``: ``K`` classifier calls, no ODE solve, no log-Jacobian.

Why not pull ``x`` along the flow instead? Transporting both densities by one map leaves their ratio
unchanged, ``log (S_# q)(S x) / (S_# p)(S x) = log q(x)/p(x)``, so moving ``x`` alone needs the
density of ``p`` (or ``q``) at two *different* points, e.g.
``log p(x) = log p_t(T_t x) + int_0^t div v``, and ``p``'s density is exactly what we do not have.
Hence the classifiers act on the fixed ``x`` space between the intermediate densities.

Two parameterisations (``mode``): ``"conditioned"`` uses one network ``phi(u, t)`` evaluated at the
interval midpoints ``t = (k + 1/2) / K`` (the discrete form of the "time score" network of Choi et
al. and Xu et al.); ``"separate"`` trains one classifier per interval.

**How many bridges.** A point ``x`` drawn from ``q`` lies far from the early members ``rho_k``
(near ``p``), so the terms ``phi_k(x)`` of the early intervals are *extrapolated* from where their
classifiers were trained (and those of the late intervals at points of ``p``). Each term's error
there has a part that does not shrink with the interval (the classifier's estimation noise, its
slope at the edge of the data carried over the distance), and the ``K`` parts add up, while a
smaller ``K`` makes each classification harder (neighbours overlap less). Measured
(``benchmarks/bench_transport_ratio.py``, 5,000 samples per side, the same classifier budget):
going from ``K = 16`` to ``K = 2`` lowered the error on points of ``q`` from about 900 to about 40
on a 2-D pair of separated mixtures with unequal spreads (the single classifier: 280), and on
points of ``p`` of the 20-D mixture pair from about 2,400 to about 130-400 (kernel densities:
1,400); on Gaussian pairs up to 20-D either count beats both baselines. Hence ``K = 2`` with
512 points per class and interval and a quadratic form per interval
(:class:`~iterflow.apps.ot.classifiers.IntervalLogits`, exact for Gaussian members, which carries
each term beyond the data with the curvature of a log-density ratio instead of linearly).

*Limits.* Where ``p`` and ``q`` do not overlap, ``log q(x)/p(x)`` at a point of ``p`` depends on the
tail of ``q`` there, which no sample shows: every estimator must extrapolate. Here each ``phi_k`` is
extrapolated from the region where ``rho_k`` and ``rho_{k+1}`` live (roughly linearly for SiLU
networks), which is far better behaved than one classifier on separable data (whose logits grow
without bound) or kernel tails (``-|x - x_i|^2 / 2h^2``), but the error still grows with the
distance between the supports and is sensitive to the classifier's training length.

All estimators work on affinely normalised coordinates ``u = (x - shift) / scale``; the log ratio is
invariant under a map applied to both densities (the Jacobians cancel), so no correction is needed.
Training: every optimiser step of the one loop draws ``batch_size`` points from ``rho_k`` and from
``rho_{k+1}`` for every interval and minimises the mean of the ``K`` logistic losses
(:func:`iterflow.methods.classifier.logistic_loss`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.apps.ot.classifiers import MODES, ClassifierOptions, IntervalLogits
from iterflow.apps.ot.phases import ProgressFn, Runtime, seeded
from iterflow.apps.ot.ratio_base import (
    RatioEstimator,
    cached_estimator,
    commit_estimator,
    fit_logistic,
    load_module,
    prefixed,
)
from iterflow.apps.ot.samples import check_points, draw_rows, fingerprint, generator_fingerprint
from iterflow.core.distributed import DistContext, local_rows
from iterflow.core.flow import Flow
from iterflow.errors import check_choice, check_positive, fail
from iterflow.methods import Loss
from iterflow.methods.classifier import logistic_loss
from iterflow.train import StepBudget

PARTICLES = ("both", "source", "target")


@dataclass(frozen=True)
class TelescopicOptions:
    """Options of :func:`fit_telescopic`.

    Attributes:
        intervals: number ``K`` of consecutive pairs ``(rho_k, rho_{k+1})``; a multiple of the
            flow's number of blocks (the times ``t_k = k/K`` then fall on a uniform grid in every
            block). Few are best (see "How many bridges" in the module docstring): the default
            2 has one intermediate member, the flow's half-way distribution.
        mode: ``"conditioned"`` (one network ``phi(u, t)``) or ``"separate"`` (one per interval).
        particles: intermediate members from ``"both"`` directions (source pushed forward mixed with
            target pulled back), only the ``"source"`` or only the ``"target"``.
        substeps: fixed ``rk4`` steps between consecutive times when moving the particles.
        classifier: network and optimisation (``batch_size`` is per class and interval).
        quadratic: add a quadratic form per interval to the logits
            (:class:`~iterflow.apps.ot.classifiers.IntervalLogits`).
    """

    intervals: int = 2
    mode: str = "conditioned"
    particles: str = "both"
    substeps: int = 2
    classifier: ClassifierOptions = ClassifierOptions(time_freqs=4, batch_size=512)
    quadratic: bool = True

    def __post_init__(self) -> None:
        check_positive(self.intervals, "intervals", integer=True)
        check_choice(self.mode, MODES, "mode")
        check_choice(self.particles, PARTICLES, "particles")
        check_positive(self.substeps, "substeps", integer=True)
        if not isinstance(self.classifier, ClassifierOptions):
            fail("classifier", "must be a ClassifierOptions", type(self.classifier).__name__)

    def to_json(self) -> dict[str, Any]:
        """JSON values (the classifier's options nested)."""
        return {**asdict(self), "classifier": self.classifier.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TelescopicOptions:
        older = {"quadratic": False}  # estimators saved before the option had none
        return cls(**{**older, **d, "classifier": ClassifierOptions(**d["classifier"])})


class TelescopicRatio(RatioEstimator):
    """``log q(x)/p(x) = sum_k phi_k(u)`` with ``u`` the flow's normalisation of ``x``.

    Build it with :func:`fit_telescopic`; see the module docstring for the derivation.
    """

    kind = "telescopic"

    def __init__(
        self, logits: IntervalLogits, shift: Tensor, scale: Tensor, options: TelescopicOptions
    ) -> None:
        super().__init__(shift, scale)
        self.logits, self.options = logits.eval(), options

    def log_ratio_u(self, u: Tensor) -> Tensor:
        return self.interval_log_ratios_u(u).sum(1)

    def interval_log_ratios_u(self, u: Tensor) -> Tensor:
        """The terms ``log rho_{k+1}(x)/rho_k(x)`` at normalised points: ``(n, K)``."""
        return self.logits.all_intervals(u.to(self.shift.dtype)).to(u.dtype)

    def interval_log_ratios(self, x: Tensor) -> Tensor:
        """The terms ``log rho_{k+1}(x)/rho_k(x)`` at points ``x`` (data units): ``(n, K)``."""
        x = check_points(x, "x", self.dim)
        with torch.no_grad():
            return self.interval_log_ratios_u(self.normalize(x))

    def state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {"dim": self.dim, "options": self.options.to_json()}, prefixed(
            self.logits, "logits."
        )

    @classmethod
    def from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> TelescopicRatio:
        options = TelescopicOptions.from_json(config["options"])
        logits = IntervalLogits(int(config["dim"]), options.intervals, options.mode,
                                options.classifier, options.quadratic)  # fmt: skip
        load_module(logits, tensors, "logits.")
        return cls(logits, tensors["shift"], tensors["scale"], options)


@torch.no_grad()
def chain_particles(
    flow: Flow,
    source: Tensor,
    target: Tensor,
    intervals: int,
    *,
    particles: str = "both",
    substeps: int = 2,
    chunk: int = 8192,
) -> list[Tensor]:
    """Samples of ``rho_0 = p, rho_1, ..., rho_K = q`` in the flow's model units.

    Arguments:
        flow: a transport flow carrying ``p`` (start of the first block) to ``q`` (end of the last);
            its ``encode`` is the forward map in model units.
        source, target: ``(n, d)`` and ``(m, d)`` samples of ``p`` and ``q`` (data units).
        intervals: ``K``, a multiple of ``flow.num_blocks``.
        particles: ``"both"``, ``"source"`` or ``"target"`` (see :class:`TelescopicOptions`).
        substeps: ``rk4`` steps between consecutive times.

    Returns:
        ``K + 1`` tensors; the first is ``normalize(source)``, the last ``normalize(target)``.
    """
    check_choice(particles, PARTICLES, "particles")
    blocks = flow.num_blocks
    if blocks < 1 or intervals % blocks != 0:
        fail(
            "intervals",
            f"must be a positive multiple of the flow's number of blocks ({blocks})",
            intervals,
        )
    per_block = intervals // blocks
    steps = per_block * substeps

    def states(x: Tensor, direction: str) -> list[Tensor]:
        start = flow.normalize(x) if direction == "decode" else x
        parts = [
            flow.trajectory(c, direction=direction, solver="rk4", steps=steps)
            for c in start.split(chunk)
        ]
        traj = flow.normalize(torch.cat(parts, 1))  # (B * steps + 1, n, d), model units
        return list(traj[::substeps].unbind(0))  # K + 1 states on the grid t_k = k / K

    u_p, u_q = flow.normalize(source), flow.normalize(target)
    fwd = states(source, "encode") if particles in ("both", "source") else None
    bwd = states(target, "decode")[::-1] if particles in ("both", "target") else None
    chain = [u_p]
    for k in range(1, intervals):
        members = [s[k] for s in (fwd, bwd) if s is not None]
        chain.append(torch.cat(members))
    chain.append(u_q)
    return chain


def fit_telescopic(
    flow: Flow,
    source: Tensor,
    target: Tensor,
    options: TelescopicOptions | None = None,
    *,
    generator: torch.Generator,
    folder: str | Path | None = None,
    progress: ProgressFn | None = None,
    ctx: DistContext | None = None,
    autocast: torch.dtype | None = None,
    checkpoint_every: int = 200,
    budget: StepBudget | None = None,
) -> TelescopicRatio:
    r"""Fit ``log q/p`` by logistic classifiers between consecutive distributions along ``flow``.

    Every optimiser step draws ``batch_size`` points from ``rho_k`` and from ``rho_{k+1}`` for every
    interval ``k`` and minimises the mean of the ``K`` logistic losses, whose minimisers are
    ``phi_k = log rho_{k+1}/rho_k``; the estimate is ``sum_k phi_k(u)`` (see the module docstring).

    Arguments:
        flow: transport flow from ``p`` to ``q`` (e.g. the ``flow`` of a
            :class:`~iterflow.apps.ot.result.TransportResult`); its normalisation is reused, its
            blocks are not trained.
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q`` (data units, on the flow's
            device).
        options: see :class:`TelescopicOptions`.
        generator: the only source of randomness (initialisation and minibatches).
        folder: estimator folder: in-fit checkpoints, then the estimator (a re-run with the same
            arguments resumes the fit, or loads the finished estimator). ``None``: nothing written.
        progress: optional callback ``(phase, step, total, terms)``.
        ctx: data-parallel context (rank 0 writes); autocast: dtype of ``torch.autocast`` around
            the loss (``None``: full precision).
        checkpoint_every: optimiser steps between checkpoints (with ``folder``).
        budget: testing aid: raise ``KeyboardInterrupt`` after that many steps.

    Returns:
        A :class:`TelescopicRatio`.

    References:
        Rhodes, Xu & Gutmann, "Telescoping density-ratio estimation", NeurIPS 2020,
        arXiv 2006.12204; Choi, Meng & Ermon, "Density ratio estimation via infinitesimal
        classification", AISTATS 2022, arXiv 2111.11010; Xu, Cheng & Xie, AISTATS 2025,
        arXiv 2305.11857.
    """
    options = options or TelescopicOptions()
    source = check_points(source, "source", flow.dim)
    target = check_points(target, "target", flow.dim)
    runtime = Runtime(progress, ctx, autocast, checkpoint_every, budget or StepBudget(None))
    config = {
        "estimator": TelescopicRatio.kind,
        "options": options.to_json(),
        "samples": fingerprint(source, target, *flow.state_dict().values()),  # data and flow
        "generator": generator_fingerprint(generator),
    }
    cached = cached_estimator(folder, TelescopicRatio, config, source.device)
    if cached is not None:
        return cached
    flow.eval()
    chain = chain_particles(flow, source, target, options.intervals, particles=options.particles,
                            substeps=options.substeps)  # fmt: skip
    kk, b = options.intervals, options.classifier.batch_size
    logits = seeded(lambda: IntervalLogits(flow.dim, kk, options.mode, options.classifier,
                                           options.quadratic), generator)  # fmt: skip
    logits = logits.to(device=source.device, dtype=source.dtype)
    k_index = torch.arange(kk, device=source.device).repeat_interleave(b)  # (K b,)

    def draw(gen: torch.Generator, _: int) -> tuple[Tensor, ...]:
        lo = torch.cat([draw_rows(chain[k], b, gen) for k in range(kk)])  # rho_k, label 0
        hi = torch.cat([draw_rows(chain[k + 1], b, gen) for k in range(kk)])  # rho_{k+1}, label 1
        return lo, hi

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        rows = local_rows(kk * b)  # the rows logistic_loss evaluates, in its order
        k = torch.cat([k_index[rows], k_index[rows]])
        return logistic_loss(lambda u: logits(u, k), batch[0], batch[1])

    fit_logistic(logits, loss_fn, draw, options.classifier, generator=generator,
                 label="telescopic classifier", runtime=runtime, folder=folder, config=config)  # fmt: skip
    norm = flow.state_dict()  # detached
    shift, scale = (norm[k].to(source).clone() for k in ("shift", "scale"))  # the logits' dtype
    est = TelescopicRatio(logits, shift, scale, options)
    return commit_estimator(est, folder, config, runtime)
