"""The options and the result of a flow-OT fit (:func:`iterflow.apps.ot.transport.fit_transport`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from iterflow.apps.ot.classifiers import check_hidden
from iterflow.apps.ot.maps import TransportCost, TransportMap
from iterflow.core.flow import Flow
from iterflow.core.nn import ACTIVATIONS
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_positive, fail
from iterflow.methods.transport import FlowOTOptions
from iterflow.train import OptimConfig


@dataclass(frozen=True)
class TransportOptions:
    """Options of :func:`~iterflow.apps.ot.transport.fit_transport`.

    Attributes:
        blocks: number ``B`` of ODE blocks (each covers ``1/B`` of the time).
        hidden, activation, time_freqs: each block's :class:`iterflow.core.nn.MLPVelocity`.
        batch_size: particles drawn from each of ``P`` and ``Q`` per step.
        init_steps, init_lr: flow-matching initialisation.
        straighten: steps of the straightening phase after the initialisation, as a fraction of
            ``init_steps`` (0 skips it): every block is trained further by flow matching on the
            straight segments of the initial flow's own pairs ``(x, T(x))`` and
            ``(T^{-1}(y), y)`` (one reflow, Liu et al. arXiv 2209.03003). Minibatch-OT pairs are
            far from the optimal coupling in more than a few dimensions, and the flow learned from
            them has curved paths whose kinetic energy exceeds ``W2^2`` (by ~10% in 20-D) even
            where its map is close to the optimal one; the reflow keeps the map and straightens
            the paths. straighten_lr: its peak learning rate; straighten_points: pairs per side
            (evenly spaced samples).
        coupling: coupling of the initialisation, ``"ot"`` (exact minibatch OT), ``"sinkhorn"`` or
            ``"independent"``.
        ot_chunk: solve the minibatch OT on chunks of this many rows (0: the whole batch up to 128
            rows, chunks of about 48 above; the default 256 solves the default batch exactly,
            ~10 ms a step, which lowers the 20-D map error by ~10% against chunks of 48).
        refine_steps, refine_lr: joint steps of the relaxed-OT refinement (0 skips it; see
            :mod:`iterflow.apps.ot.transport` for why it is off by default) and the flow's
            learning rate there. Each step updates the classifiers once, so the flow must move
            slowly enough for them to follow.
        gamma: weight of the two KL terms (large: the end points must match; the optimum of the
            relaxed problem stops short of ``Q`` by a fraction of order ``sigma^2 / gamma`` of the
            way for Gaussians of variance ``sigma^2`` in model units).
        classifier_hidden, classifier_lr: the two KL classifiers
            (:class:`~iterflow.apps.ot.classifiers.LogitNet`) and their learning rate.
        classifier_steps: how far the classifiers move per joint refinement step, in Adam steps at
            ``classifier_lr``: every step updates the flow and the classifiers together, the
            classifiers at ``classifier_steps * classifier_lr`` (0: frozen after the warm-up).
        classifier_batch_size: particles per side of the classifiers' loss in each step (moved
            without gradients, so it can be much larger than ``batch_size``).
        classifier_warmup: classifier steps (at ``classifier_lr``, no clipping) on the initial flow
            before refinement starts.
        solver, steps: fixed-step solver and steps per block used while refining.
        eval_steps: ``rk4`` steps per block of the returned maps and of the cost estimate.
        ema: decay of the weights' moving average in the initialisation and the refinement
            (0 disables).
        grad_clip: gradient-norm clip of the initialisation and the refinement (0 disables).
    """

    blocks: int = 2
    hidden: tuple[int, ...] = (128, 128, 128)
    activation: str = "silu"
    time_freqs: int = 0
    batch_size: int = 256
    init_steps: int = 2000
    init_lr: float = 2e-3
    straighten: float = 0.25
    straighten_lr: float = 1e-3
    straighten_points: int = 8192
    coupling: str = "ot"
    ot_chunk: int = 256
    refine_steps: int = 0
    refine_lr: float = 2.5e-5
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
            check_hidden(getattr(self, name), name)
        for name in ("blocks", "batch_size", "classifier_batch_size", "steps", "eval_steps",
                     "straighten_points"):  # fmt: skip
            check_positive(getattr(self, name), name, integer=True)
        for name in ("init_steps", "refine_steps", "classifier_steps", "classifier_warmup",
                     "ot_chunk", "time_freqs"):  # fmt: skip
            check_positive(getattr(self, name), name, integer=True, allow_zero=True)
        for name in ("init_lr", "refine_lr", "classifier_lr", "gamma", "straighten_lr"):
            check_positive(getattr(self, name), name)
        check_positive(self.straighten, "straighten", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip", allow_zero=True)
        ACTIVATIONS.get(self.activation, "activation")
        self.objective()  # validates gamma, solver, steps, coupling, ot_chunk
        if not 0.0 <= self.ema < 1.0:
            fail("ema", "must be in [0, 1)", self.ema)
        if self.init_steps == 0 and self.refine_steps == 0:
            fail("init_steps", "and refine_steps must not both be 0", 0)

    def objective(self) -> FlowOTOptions:
        """The options of the flow-OT objective (:mod:`iterflow.methods.transport`)."""
        return FlowOTOptions(self.gamma, self.solver, self.steps, self.coupling, self.ot_chunk)

    def init_config(self, checkpoint_every: int = 500) -> OptimConfig:
        """The loop's settings of the flow-matching initialisation."""
        return _config(self.init_steps, self.batch_size, self.init_lr, self.grad_clip, self.ema,
                       checkpoint_every)  # fmt: skip

    @property
    def straighten_steps(self) -> int:
        """Steps of the straightening phase: ``round(straighten * init_steps)``."""
        return round(self.straighten * self.init_steps)

    def straighten_config(self, checkpoint_every: int = 500) -> OptimConfig:
        """The loop's settings of the straightening phase (schedule as the initialisation's)."""
        return _config(self.straighten_steps, self.batch_size, self.straighten_lr,
                       self.grad_clip, self.ema, checkpoint_every)  # fmt: skip

    def warmup_config(self, checkpoint_every: int = 500) -> OptimConfig:
        """The loop's settings of the classifier warm-up: constant ``classifier_lr``, no clipping."""
        return OptimConfig(
            steps=self.classifier_warmup,
            batch_size=self.classifier_batch_size,
            lr=self.classifier_lr,
            lr_schedule="constant",
            grad_clip=0.0,
            checkpoint_every=checkpoint_every,
            log_every=max(1, self.classifier_warmup // 100),
        )

    def refine_config(self, checkpoint_every: int = 500) -> OptimConfig:
        """The loop's settings of the joint refinement (the flow's learning rate; see
        :meth:`refine_lr_scales` for the classifiers')."""
        return _config(self.refine_steps, self.batch_size, self.refine_lr, self.grad_clip,
                       self.ema, checkpoint_every)  # fmt: skip

    def refine_lr_scales(self, prefix: str) -> dict[str, float]:
        """Learning-rate factor of the classifiers (parameter names starting with ``prefix``)."""
        return {prefix: self.classifier_steps * self.classifier_lr / self.refine_lr}

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


def _config(
    steps: int, batch: int, lr: float, clip: float, ema: float, checkpoint_every: int
) -> OptimConfig:
    """Warm-up over 5% of the steps, cosine decay to 5% of ``lr``."""
    return OptimConfig(
        steps=steps,
        batch_size=batch,
        lr=lr,
        warmup=max(1, steps // 20),
        grad_clip=clip,
        ema=ema,
        checkpoint_every=checkpoint_every,
        log_every=max(1, steps // 100),
    )


@dataclass(eq=False)
class TransportResult:
    """What :func:`~iterflow.apps.ot.transport.fit_transport` returns.

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


def make_result(
    flow: Flow, cost: TransportCost, options: TransportOptions, history: list[dict[str, Any]]
) -> TransportResult:
    """A :class:`TransportResult` whose maps integrate with ``options.eval_steps`` ``rk4`` steps."""
    spec = SolverSpec("rk4", options.eval_steps)
    return TransportResult(
        flow=flow,
        forward=TransportMap(flow, "forward", spec),
        backward=TransportMap(flow, "backward", spec),
        cost=cost,
        options=options,
        history=history,
    )
