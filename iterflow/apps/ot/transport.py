r"""Flow-based optimal transport between two sample sets (Xu, Cheng & Xie, arXiv 2305.11857).

Given samples of ``P`` and ``Q``, learn an invertible flow ``dx/dt = v(x, t)``, ``t in [0, 1]``,
that carries ``P`` (``t = 0``) to ``Q`` (``t = 1``) with (near) minimal kinetic energy, the dynamic
(Benamou-Brenier) form of optimal transport,

.. math::
    W_2^2(P, Q) = \min_v \int_0^1 E \lVert v(x(t), t) \rVert^2 \, dt
    \quad \text{over flows with } x(0) \sim P,\ x(1) \sim Q .

**Objective.** The end-point constraint is relaxed by two KL terms (tutorial eq. 27),

.. math::
    \int_0^1 E \lVert v \rVert^2 dt + \gamma\, KL(P \,\|\, \hat P) + \gamma\, KL(Q \,\|\, \hat Q),
    \qquad \hat P = T^{-1}_\# Q,\ \hat Q = T_\# P,

with ``T`` the time-1 map. Since ``T`` is invertible, ``KL(P || T^{-1}_# Q) = KL(T_# P || Q)`` and
``KL(Q || T_# P) = KL(T^{-1}_# Q || P)``: the first is measured on source particles pushed forward,
the second on target particles pulled back, so the flow is trained in both directions. Each KL is
estimated by a logistic classifier (minimiser ``log f1/f0``, see :mod:`iterflow.apps.ratio`):
``c_f ~ log Q / T_# P`` trained on ``T(x)`` (label 0) vs ``y ~ Q`` (label 1), so that
``KL(T_# P || Q) = -E_P c_f(T(x))``, and ``c_b ~ log P / T^{-1}_# Q`` likewise. Classifier and flow
updates alternate; with the classifier held fixed, the gradient of ``-E c_f(T_theta(x))`` is the
gradient of the KL along the push-forward (its first variation is ``log(T_# P / Q) = -c_f``).

**Kinetic term.** On the fixed-step grid ``t_0 < ... < t_J`` of the solver the kinetic energy of a
particle is approximated by ``sum_j |x(t_{j+1}) - x(t_j)|^2 / (t_{j+1} - t_j)`` (a lower bound that
becomes exact as the grid is refined; it is what the refinement minimises). The reported
``W_2^2`` estimate integrates ``|v|^2`` along finer ``rk4`` trajectories by Simpson's rule.

**Blocks and initialisation.** The flow is an :class:`iterflow.flow.Flow` of ``B`` blocks; block
``n`` covers ``t in [n/B, (n+1)/B]`` in its own time ``s = B t - n``, so ``dx/ds = v(x, t) / B`` and
``int E|v|^2 dt = B sum_n int_0^1 E|v_n|^2 ds``. The blocks are initialised by flow matching with a
minibatch-OT coupling between ``P`` and ``Q`` (Tong et al. 2023, arXiv 2302.00482; Pooladian et al.
2023, arXiv 2304.14772): a coupled pair ``(x0, x1)`` gives block ``n`` the straight segment from
``x0 + (n/B)(x1 - x0)`` to ``x0 + ((n+1)/B)(x1 - x0)`` (one call of
:func:`iterflow.methods.fm.flow_matching_loss`), and then all blocks are refined jointly on the
objective above.

**Units and maps.** The flow holds the normalisation ``u = (x - shift) / scale`` with ``shift`` the
pooled mean and ``scale`` *one* number (the pooled root-mean-square standard deviation): an
isotropic scaling maps optimal transport maps to optimal transport maps, a per-dimension one would
not. In model units the forward map ``P -> Q`` is ``flow.encode`` and the backward map is
``flow.decode``; in data units they are :attr:`TransportResult.forward`
``= denormalize o encode`` and :attr:`TransportResult.backward` ``= decode o normalize``.
``Flow.log_prob`` assumes an ``N(0, I)`` end and does not apply to a transport flow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iterflow._version import __version__
from iterflow.apps.ot.ratio import (
    LogitNet,
    ProgressFn,
    _check_hidden,
    _check_points,
    _draw,
    _evenly,
    _seeded,
    _step,
    cosine_lr,
    logistic_loss,
)
from iterflow.core.couplings import COUPLINGS, couple
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import ACTIVATIONS, NETWORKS, MLPVelocity
from iterflow.core.ode import FIXED_SOLVERS, SolverSpec
from iterflow.errors import check_choice, check_positive, fail
from iterflow.io import FORMAT_VERSION, load_json, save_json, save_tensors
from iterflow.methods.fm import FMOptions, flow_matching_loss
from iterflow.train import DTYPES, RunDir, load_flow

TRANSPORT_META = "transport.json"


@dataclass(frozen=True)
class TransportOptions:
    """Options of :func:`fit_transport`.

    Attributes:
        blocks: number ``B`` of ODE blocks (each covers ``1/B`` of the time).
        hidden, activation, time_freqs: each block's :class:`iterflow.nn.MLPVelocity`.
        batch_size: particles drawn from each of ``P`` and ``Q`` per step.
        init_steps, init_lr: flow-matching initialisation.
        coupling: coupling of the initialisation, ``"ot"`` (exact minibatch OT), ``"sinkhorn"`` or
            ``"independent"``.
        ot_chunk: solve the minibatch OT on chunks of this many rows (0: the whole batch).
        refine_steps, refine_lr: flow updates of the relaxed-OT refinement (0 skips it).
        gamma: weight of the two KL terms (large: the end points must match; the optimum of the
            relaxed problem stops short of ``Q`` by a fraction of order ``sigma^2 / gamma`` of the
            way for Gaussians of variance ``sigma^2`` in model units).
        classifier_hidden, classifier_lr: the two KL classifiers
            (:class:`~iterflow.apps.ratio.LogitNet`).
        classifier_steps: classifier updates before each flow update.
        classifier_batch_size: particles per side in each classifier update (pushed without
            gradients, so it can be much larger than ``batch_size``).
        classifier_warmup: classifier updates on the initial flow before refinement starts.
        solver, steps: fixed-step solver and steps per block used while refining.
        eval_steps: ``rk4`` steps per block of the returned maps and of the cost estimate.
        ema: decay of the flow weights' moving average in both phases (0 disables).
        grad_clip: gradient-norm clip (0 disables).
    """

    blocks: int = 2
    hidden: tuple[int, ...] = (128, 128, 128)
    activation: str = "silu"
    time_freqs: int = 0
    batch_size: int = 256
    init_steps: int = 2000
    init_lr: float = 2e-3
    coupling: str = "ot"
    ot_chunk: int = 0
    refine_steps: int = 300
    refine_lr: float = 5e-5
    gamma: float = 100.0
    classifier_hidden: tuple[int, ...] = (64, 64)
    classifier_lr: float = 1e-3
    classifier_steps: int = 2
    classifier_batch_size: int = 1024
    classifier_warmup: int = 200
    solver: str = "rk4"
    steps: int = 2
    eval_steps: int = 16
    ema: float = 0.995
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hidden", "classifier_hidden"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            _check_hidden(getattr(self, name), name)
        for name in ("blocks", "batch_size", "classifier_batch_size", "steps", "eval_steps"):
            check_positive(getattr(self, name), name, integer=True)
        for name in (
            "init_steps",
            "refine_steps",
            "classifier_steps",
            "classifier_warmup",
            "ot_chunk",
            "time_freqs",
        ):
            check_positive(getattr(self, name), name, integer=True, allow_zero=True)
        for name in ("init_lr", "refine_lr", "classifier_lr", "gamma"):
            check_positive(getattr(self, name), name)
        check_positive(self.grad_clip, "grad_clip", allow_zero=True)
        ACTIVATIONS.get(self.activation, "activation")
        COUPLINGS.get(self.coupling, "coupling")
        FIXED_SOLVERS.get(self.solver, "solver")
        if not 0.0 <= self.ema < 1.0:
            fail("ema", "must be in [0, 1)", self.ema)
        if self.init_steps == 0 and self.refine_steps == 0:
            fail("init_steps", "and refine_steps must not both be 0", 0)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"], d["classifier_hidden"] = list(self.hidden), list(self.classifier_hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TransportOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            fail("options", f"keys must be among {sorted(known)}", unknown)
        return cls(**d)


# ------------------------------------------------------------------------------------------------
# Closed forms between Gaussians (for tests and sanity checks)
# ------------------------------------------------------------------------------------------------


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_w2_sq(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> float:
    r"""``W_2^2(N(m1, S1), N(m2, S2)) = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2
    S1^{1/2})^{1/2})``."""
    r1 = _sqrtm_psd(s1.double())
    cross = _sqrtm_psd(r1 @ s2.double() @ r1)
    return float(
        (m1 - m2).double().pow(2).sum() + torch.trace(s1.double() + s2.double() - 2 * cross)
    )


def gaussian_ot_map(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    r"""The optimal map ``T(x) = m2 + A (x - m1)`` from ``N(m1, S1)`` to ``N(m2, S2)``.

    ``A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}`` (symmetric positive definite).

    Returns:
        ``(A, b)`` with ``T(x) = x @ A.T + b`` in float64.
    """
    r1 = _sqrtm_psd(s1.double())
    r1_inv = torch.linalg.inv(r1)
    a = r1_inv @ _sqrtm_psd(r1 @ s2.double() @ r1) @ r1_inv
    return a, m2.double() - a @ m1.double()


class GaussianOTVelocity(nn.Module):
    r"""Velocity of the exact OT (displacement) interpolation between two Gaussians, for one block.

    With the optimal map ``T(x) = A x + c`` (:func:`gaussian_ot_map`), particles move on straight
    lines at constant speed, ``x_t = x_0 + t ((A - I) x_0 + c)``, so at global time ``t`` the
    velocity is ``(A - I) x_0 + c`` with ``x_0 = (I + t (A - I))^{-1} (x_t - t c)``. Block ``index``
    of ``blocks`` covers ``t = (index + s) / blocks``, hence the velocity in block time is that
    divided by ``blocks``. A closed-form reference flow for tests and benchmarks (registered as
    network ``gaussian-ot``).

    Arguments:
        dim: dimension.
        index, blocks: which block of how many.
        a, c: ``(d, d)`` and ``(d,)``; default identity and zero (the identity flow).
    """

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


NETWORKS.register("gaussian-ot", GaussianOTVelocity)


def gaussian_ot_flow(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, blocks: int = 1) -> Flow:
    """The exact optimal-transport flow from ``N(m1, S1)`` to ``N(m2, S2)`` (float64, identity
    normalisation): ``encode`` is the optimal map, every path a straight constant-speed line, and
    the kinetic energy of a particle equals its squared displacement."""
    a, c = gaussian_ot_map(m1, s1, m2, s2)
    d = a.shape[0]
    blks = [Block(GaussianOTVelocity(d, n, blocks, a, c)) for n in range(blocks)]
    return Flow(blks, (d,)).double()


# ------------------------------------------------------------------------------------------------
# Maps, results, costs
# ------------------------------------------------------------------------------------------------


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
        x = _check_points(x, "x", self.flow.dim)
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


@dataclass(eq=False)
class TransportResult:
    """What :func:`fit_transport` returns.

    Attributes:
        flow: the blocks carrying ``P`` (start) to ``Q`` (end), with the normalisation.
        forward, backward: the maps ``P -> Q`` and ``Q -> P`` in data units.
        cost: kinetic energies and displacements (``cost.w2_sq`` estimates ``W_2^2(P, Q)``).
        options: the options used.
        history: one record per phase (steps, seconds, last loss terms).
    """

    flow: Flow
    forward: TransportMap
    backward: TransportMap
    cost: TransportCost
    options: TransportOptions
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def w2_sq(self) -> float:
        """The kinetic-energy estimate of ``W_2^2(P, Q)``."""
        return self.cost.w2_sq


def transport_normalization(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``shift``: pooled mean ``(d,)``; ``scale``: the pooled RMS standard deviation, one number
    repeated ``d`` times (isotropic, so optimal maps stay optimal)."""
    both = torch.cat([source, target])
    shift = both.mean(0)
    scale = both.var(0).mean().sqrt().clamp_min(1e-6)
    return shift, scale.expand_as(shift).clone()


def _segment_energy(states: Sequence[Tensor], dt: float) -> Tensor:
    """``sum_j |x_{j+1} - x_j|^2 / dt`` per particle ``(n,)`` for states on a uniform grid."""
    diffs = torch.stack([b - a for a, b in zip(states[:-1], states[1:])])  # (J, n, d)
    return diffs.pow(2).sum(-1).sum(0) / dt


def _path(flow: Flow, u: Tensor, spec: SolverSpec, reverse: bool) -> list[Tensor]:
    """Model-unit states through all blocks on the fixed grid (``B * steps + 1``),
    differentiable."""
    states = [u]
    for b in reversed(flow.blocks) if reverse else flow.blocks:
        states.extend(b.path(states[-1], spec, reverse=reverse)[1:])
    return states


@torch.no_grad()
def kinetic_energy(flow: Flow, x: Tensor, *, direction: str = "forward", steps: int = 16) -> Tensor:
    r"""``int_0^1 |v(x(t), t)|^2 dt`` per particle in data units, shape ``(n,)``.

    Integrates every block with ``steps`` ``rk4`` steps from ``x`` (``P`` side for ``"forward"``,
    ``Q`` side for ``"backward"``) and applies Simpson's rule (trapezoid for odd ``steps``) to
    ``|scale * v_n(x(s), s)|^2`` on the grid; block ``n`` contributes ``B int_0^1 |.|^2 ds``.
    """
    check_choice(direction, ("forward", "backward"), "direction")
    check_positive(steps, "steps", integer=True)
    x = _check_points(x, "x", flow.dim)
    return _kinetic_and_end(flow, x, direction == "backward", steps)[0]


@torch.no_grad()
def _kinetic_and_end(flow: Flow, x: Tensor, reverse: bool, steps: int) -> tuple[Tensor, Tensor]:
    """:func:`kinetic_energy` of checked points ``x`` and where their paths end, in data units
    (the forward map of ``x``, or the backward map when ``reverse``: the same ``rk4`` integration
    as :class:`TransportMap` with ``steps`` steps)."""
    spec = SolverSpec("rk4", steps)
    u = flow.normalize(x)
    scale = flow.scale.to(x)
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype, device=x.device)
    times = grid.flip(0) if reverse else grid
    weights = _quadrature(steps, x)
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for b in reversed(flow.blocks) if reverse else flow.blocks:
        states = b.path(u, spec, reverse=reverse)
        e = torch.stack([(b.velocity(s, t) * scale).pow(2).sum(-1) for s, t in zip(states, times)])
        total = total + flow.num_blocks * (weights[:, None] * e).sum(0)
        u = states[-1]
    return total, flow.denormalize(u)


def _quadrature(steps: int, like: Tensor) -> Tensor:
    """Weights of Simpson's rule on ``steps + 1`` uniform nodes of [0, 1] (trapezoid if odd)."""
    h = 1.0 / steps
    if steps % 2 == 0:
        w = [1.0] + [4.0 if j % 2 else 2.0 for j in range(1, steps)] + [1.0]
        return torch.tensor(w, dtype=torch.float64).mul(h / 3).to(like)
    w = [0.5] + [1.0] * (steps - 1) + [0.5]
    return torch.tensor(w, dtype=torch.float64).mul(h).to(like)


def transport_cost(flow: Flow, source: Tensor, target: Tensor, *, steps: int = 16) -> TransportCost:
    """Kinetic energies and displacements of ``flow`` on samples of ``P`` and ``Q`` (data units)."""
    check_positive(steps, "steps", integer=True)
    source = _check_points(source, "x", flow.dim)
    target = _check_points(target, "x", flow.dim)
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


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


class _EMA:
    """Exponential moving average of parameters, copied into them by :meth:`finish`."""

    def __init__(self, params: list[Tensor], decay: float) -> None:
        self.params, self.decay = params, decay
        self.live = [p.detach() for p in params]  # lerp sources, built once (not per step)
        self.shadow = [p.detach().clone() for p in params] if decay > 0 else None

    def update(self, step: int) -> None:
        if self.shadow is not None:
            d = min(self.decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.shadow, self.live, 1 - d)

    def finish(self) -> None:
        if self.shadow is not None:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow):
                    p.copy_(s)


def _report(
    progress: ProgressFn | None, phase: str, step: int, total: int, terms: dict[str, Tensor]
) -> None:
    if progress is not None and ((step + 1) % max(1, total // 100) == 0 or step + 1 == total):
        progress(phase, step + 1, total, {k: float(v) for k, v in terms.items()})


def _check_loss(value: Tensor, phase: str, step: int) -> None:
    if not math.isfinite(float(value.detach())):
        raise FloatingPointError(
            f"{phase}: loss became {float(value)} at step {step + 1}; lower the lr"
        )


def initialize_by_flow_matching(
    flow: Flow,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train the blocks by flow matching on minibatch-OT pairs, block ``n`` on its segment.

    For a pair ``(x0, x1)`` block ``n`` regresses its velocity on the segment
    ``a_n = x0 + (n/B)(x1 - x0) -> a_{n+1}``; the loss is ``B^2`` times the mean of the blocks'
    flow-matching losses (that is, measured in global-time velocity units).
    """
    nb, steps = flow.num_blocks, options.init_steps
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=options.init_lr)
    ema = _EMA(params, options.ema)
    fm = FMOptions(coupling="independent")
    t0 = time.perf_counter()
    value = torch.tensor(float("nan"))
    for step in range(steps):
        x0 = _draw(u_p, options.batch_size, generator)
        x1 = _draw(u_q, options.batch_size, generator)
        x0, x1 = couple(x0, x1, options.coupling, chunk=options.ot_chunk, generator=generator)
        losses = []
        for n, b in enumerate(flow.blocks):
            a0, a1 = x0 + (n / nb) * (x1 - x0), x0 + ((n + 1) / nb) * (x1 - x0)
            losses.append(flow_matching_loss(b.velocity, a0, a1, fm, generator).value())
        value = nb**2 * torch.stack(losses).mean()
        _check_loss(value, "flow-matching initialisation", step)
        _step(opt, params, value, cosine_lr(options.init_lr, step, steps), options.grad_clip)
        ema.update(step)
        _report(progress, "flow matching (OT pairs)", step, steps, {"fm": value.detach()})
    ema.finish()
    return {
        "phase": "init",
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "final_fm": float(value.detach()),
    }


def refine(
    flow: Flow,
    u_p: Tensor,
    u_q: Tensor,
    options: TransportOptions,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    r"""Minimise ``kinetic + gamma (KL(T_# P || Q) + KL(T^{-1}_# Q || P))`` with classifier KLs.

    Each step first updates the classifiers ``c_f`` (``T(x)`` vs ``y``) and ``c_b`` (``T^{-1}(y)``
    vs ``x``) ``classifier_steps`` times on fresh batches of ``classifier_batch_size`` particles
    moved without gradients, then draws ``x ~ P``, ``y ~ Q`` (model units, ``batch_size`` each),
    integrates ``T(x)`` and ``T^{-1}(y)`` with the fixed-step solver keeping the graph, and takes
    one flow step on ``(E_f + E_b)/2 - gamma (E c_f(T x) + E c_b(T^{-1} y))`` with ``E_f, E_b`` the
    kinetic energies of the two batches (model units).
    """
    d, nb = flow.dim, flow.num_blocks
    spec = SolverSpec(options.solver, options.steps)
    dt = 1.0 / (nb * options.steps)
    like = u_p

    def make() -> LogitNet:
        return _seeded(
            lambda: LogitNet(d, options.classifier_hidden, options.activation), generator
        )

    c_f, c_b = make().to(like), make().to(like)
    c_params = [*c_f.parameters(), *c_b.parameters()]
    c_opt = torch.optim.Adam(c_params, lr=options.classifier_lr)
    params = [p for p in flow.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=options.refine_lr)
    ema = _EMA(params, options.ema)
    b, bc = options.batch_size, options.classifier_batch_size

    def classifier_step(z: Tensor, y: Tensor, w: Tensor, x: Tensor) -> Tensor:
        loss = logistic_loss(c_f(z), c_f(y)) + logistic_loss(c_b(w), c_b(x))
        c_opt.zero_grad(set_to_none=True)
        loss.backward()
        c_opt.step()
        return loss.detach()

    def classifier_round(steps: int) -> Tensor:
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            x, y = _draw(u_p, bc, generator), _draw(u_q, bc, generator)
            with torch.no_grad():
                z, w = _path(flow, x, spec, False)[-1], _path(flow, y, spec, True)[-1]
            loss = classifier_step(z, y, w, x)
        return loss

    t0 = time.perf_counter()
    for step in range(options.classifier_warmup):
        c_loss = classifier_round(1)
        _report(
            progress,
            "KL classifiers (warm-up)",
            step,
            options.classifier_warmup,
            {"logistic": c_loss},
        )
    terms: dict[str, Tensor] = {}
    for step in range(options.refine_steps):
        c_loss = classifier_round(options.classifier_steps)
        x, y = _draw(u_p, b, generator), _draw(u_q, b, generator)
        fwd, bwd = _path(flow, x, spec, False), _path(flow, y, spec, True)
        z, w = fwd[-1], bwd[-1]
        kin = 0.5 * (_segment_energy(fwd, dt).mean() + _segment_energy(bwd, dt).mean())
        kl_f, kl_b = -c_f(z).mean(), -c_b(w).mean()
        loss = kin + options.gamma * (kl_f + kl_b)
        _check_loss(loss, "transport refinement", step)
        lr = cosine_lr(options.refine_lr, step, options.refine_steps)
        _step(opt, params, loss, lr, options.grad_clip)
        ema.update(step)
        terms = {
            "kinetic": kin.detach(),
            "kl_fwd": kl_f.detach(),
            "kl_bwd": kl_b.detach(),
            "logistic": c_loss,
        }
        _report(progress, "relaxed-OT refinement", step, options.refine_steps, terms)
    ema.finish()
    return {
        "phase": "refine",
        "steps": options.refine_steps,
        "seconds": time.perf_counter() - t0,
        **{f"final_{k}": float(v) for k, v in terms.items()},
    }


def build_transport_flow(
    dim: int, shift: Tensor, scale: Tensor, options: TransportOptions, generator: torch.Generator
) -> Flow:
    """``options.blocks`` fresh :class:`~iterflow.nn.MLPVelocity` blocks with the normalisation."""
    blocks = [
        Block(
            _seeded(
                lambda: MLPVelocity(dim, options.hidden, options.activation, options.time_freqs),
                generator,
            )
        )
        for _ in range(options.blocks)
    ]
    return Flow(blocks, (dim,), shift=shift, scale=scale)


def fit_transport(
    source: Tensor,
    target: Tensor,
    options: TransportOptions | None = None,
    *,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
    eval_points: int = 20000,
) -> TransportResult:
    """Learn a flow transporting ``P`` (``source`` samples) to ``Q`` (``target``) at minimal cost.

    Arguments:
        source, target: ``(n, d)`` and ``(m, d)`` samples (data units); their device and dtype are
            the flow's.
        options: see :class:`TransportOptions`.
        generator: the only source of randomness (initialisation, minibatches, flow-matching times);
            a generator on the samples' device.
        progress: optional callback ``(phase, step, total, terms)``.
        eval_points: at most this many samples of each side (evenly spaced) for the cost estimate.

    Returns:
        A :class:`TransportResult`; ``result.w2_sq`` estimates ``W_2^2(P, Q)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p, q = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g) + 3
        >>> opts = TransportOptions(blocks=1, hidden=(32,), init_steps=50, refine_steps=5,
        ...                         classifier_warmup=5)
        >>> res = fit_transport(p, q, opts, generator=g)
        >>> res.forward(p[:3]).shape
        torch.Size([3, 2])

    References:
        Xu, Cheng & Xie, "Computing high-dimensional optimal transport by flow neural networks",
        AISTATS 2025, arXiv 2305.11857.
    """
    options = options or TransportOptions()
    source = _check_points(source, "source")
    target = _check_points(target, "target", source.shape[1])
    shift, scale = transport_normalization(source, target)
    flow = build_transport_flow(source.shape[1], shift, scale, options, generator)
    flow = flow.to(device=source.device, dtype=source.dtype)
    u_p, u_q = flow.normalize(source), flow.normalize(target)
    history = []
    flow.train()
    if options.init_steps > 0:
        history.append(initialize_by_flow_matching(flow, u_p, u_q, options, generator, progress))
    if options.refine_steps > 0:
        history.append(refine(flow, u_p, u_q, options, generator, progress))
    flow.eval()
    cost = transport_cost(
        flow, _evenly(source, eval_points), _evenly(target, eval_points), steps=options.eval_steps
    )
    return _result(flow, cost, options, history)


def _result(
    flow: Flow, cost: TransportCost, options: TransportOptions, history: list[dict[str, Any]]
) -> TransportResult:
    spec = SolverSpec("rk4", options.eval_steps)
    return TransportResult(
        flow=flow,
        forward=TransportMap(flow, "forward", spec),
        backward=TransportMap(flow, "backward", spec),
        cost=cost,
        options=options,
        history=history,
    )


# ------------------------------------------------------------------------------------------------
# Run folder
# ------------------------------------------------------------------------------------------------


def save_transport(
    result: TransportResult, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write a transport run: ``blocks/block_XXX.safetensors``, ``normalization.safetensors`` and
    ``transport.json`` (options, network configs, cost, history and ``extra``), written last.

    Nothing is pickled; :func:`load_transport` reads it back.
    """
    folder, run = Path(folder), RunDir(folder)
    flow = result.flow
    for i, b in enumerate(flow.blocks):
        save_tensors(run.block(i), b.state_dict())
    save_tensors(run.normalization, {"shift": flow.shift, "scale": flow.scale})
    meta = {
        "format_version": FORMAT_VERSION,
        "iterflow_version": __version__,
        "kind": "transport",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "event_shape": list(flow.event_shape),
        "dtype": str(flow.shift.dtype).removeprefix("torch."),
        "networks": [b.velocity.config() for b in flow.blocks],
        "options": result.options.to_json(),
        "cost": asdict(result.cost),
        "history": result.history,
        **(extra or {}),
    }
    save_json(folder / TRANSPORT_META, meta)
    return folder


def load_transport_meta(folder: str | Path) -> dict[str, Any]:
    """``transport.json`` of a run folder (InputError if it is not a transport run)."""
    folder = Path(folder)
    if not folder.is_dir():
        fail("run", "must be an existing transport run folder", str(folder))
    meta = load_json(folder / TRANSPORT_META, "run")
    if not isinstance(meta, dict) or meta.get("kind") != "transport" or "networks" not in meta:
        fail("run", f"{TRANSPORT_META} must describe a transport run", str(folder))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        fail(
            "run",
            f"was written by a newer iterflow (format {meta.get('format_version')})",
            str(folder),
        )
    return meta


def load_transport(folder: str | Path, *, device: str | torch.device = "cpu") -> TransportResult:
    """Rebuild the :class:`TransportResult` saved by :func:`save_transport` (never unpickles)."""
    folder, run = Path(folder), RunDir(folder)
    meta = load_transport_meta(folder)
    dtype = DTYPES.get(meta.get("dtype", "float32"))
    if dtype is None:
        fail("run", "transport.json 'dtype' must be float32 or float64", meta.get("dtype"))
    flow = load_flow(
        run,
        meta["networks"],
        meta["event_shape"],
        dtype=dtype,
        device=device,
        source=TRANSPORT_META,
    )
    options = TransportOptions.from_json(meta["options"])
    cost = TransportCost(**meta["cost"])
    return _result(flow, cost, options, list(meta.get("history", [])))
