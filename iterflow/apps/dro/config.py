"""The options of the flow-based worst-case map (:class:`DROConfig`, saved with the map): the
objective's (:class:`~iterflow.methods.worst_case.WorstCaseOptions`), the map's networks, the
optimisation (:class:`~iterflow.train.loop.OptimConfig`) and the run's device and precision."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from iterflow.core.nn import ACTIVATIONS
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_positive, fail
from iterflow.methods.worst_case import WorstCaseOptions
from iterflow.train.config import DTYPES
from iterflow.train.loop import OptimConfig

AUTOCAST = ("auto", "none", "bf16")
#: Keys that may change when a run is resumed without changing the trained map.
RUNTIME_KEYS = ("device", "checkpoint_every")


@dataclass(frozen=True)
class DROConfig:
    """Options of the flow-based worst-case map (saved with it).

    Attributes:
        gamma: Lagrange parameter of the Wasserstein budget (larger = farther moves).
        blocks: number of ODE blocks in the map.
        schedule: ``joint`` (all blocks optimise the objective together; the map is the proximal step
            of size ``gamma``) or ``progressive`` (block ``k`` is trained alone on the particles pushed by
            blocks ``< k``, each a proximal step of size ``gamma / blocks``: a Wasserstein proximal
            gradient flow as in FlowDRO; for a linear risk both give ``x + gamma a``, in general the
            progressive chain approximates the gradient flow of ``R`` run for time ``gamma``).
        hidden, activation, time_freqs: each block's velocity MLP (the output layer starts at zero,
            so the map starts as the identity).
        solver, ode_steps: fixed-step solver and its steps per block (RK4, 8 steps by default).
        kinetic: weight ``lambda`` of the path regulariser
            ``lambda / (2 gamma) * E[K * sum_k int_0^1 |v_k|^2 ds - |F(X) - X|^2]`` (``K`` blocks,
            velocities in data units). By Cauchy-Schwarz it is >= 0, and 0 exactly for straight paths
            at constant speed; the optimal map is reached by such paths, so the regulariser makes
            trajectories straight (the map smooth) without moving the optimum. ``lambda = 1`` turns the
            transport term into the kinetic energy (Benamou-Brenier form).
        steps, batch_size, lr, lr_schedule, weight_decay, grad_clip: optimisation (Adam / AdamW),
            per block for the progressive schedule.
        gamma_warmup, gamma_start: continuation in ``gamma``: over the first ``gamma_warmup`` of the
            optimiser steps (per block) the Lagrange parameter grows geometrically from
            ``gamma * gamma_start`` to ``gamma``, then stays there. For a non-concave risk (a
            classifier's loss) the objective has many local maxima; starting at a small budget lets
            every point first follow its own local ascent direction, as per-sample gradient ascent
            does, instead of being dragged by the early, shared moves of the network into a worse
            basin (digits, ``gamma = 3``: training objective 11.2 with the warm-up, 9.5 without,
            per-sample ascent 11.0). The optimum of the final objective is unchanged.
            ``gamma_warmup = 0`` turns it off.
        standardize: the flow's normalisation from the reference (``dim``, ``scalar``, ``none``, ``auto``;
            see :func:`iterflow.train.standardization`); coordinates that are (nearly) constant on the
            reference keep the overall standard deviation, so new points that vary there stay finite.
        condition: ``auto`` (default): when the risk is label-dependent (a classifier's
            cross-entropy, see :func:`~iterflow.apps.dro.risks.uses_labels`) and the reference
            points have labels, every block's velocity also gets the label (a class embedding in
            its first layer), so the map is ``F(x, c)``: near a decision boundary, points of
            different classes at the same place are pushed in opposite directions, which a map of
            ``x`` alone can only average. ``none``: a map of ``x`` alone.
        seed: initialisation and minibatches. dtype: ``float32`` or ``float64``.
        log_every: steps between history records.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``None`` (default): the device of the
            reference points.
        autocast: mixed precision of the objective's forward passes: ``none``, ``bf16`` (weights
            stay in ``dtype``, which must be ``float32``) or ``auto`` (full precision: bf16 is not
            measured to keep the worst-case maps).
        checkpoint_every: steps between in-stage checkpoints of a run folder.
    """

    gamma: float = 1.0
    blocks: int = 1
    schedule: str = "joint"
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"
    time_freqs: int = 0
    solver: str = "rk4"
    ode_steps: int = 8
    kinetic: float = 0.0
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma_warmup: float = 0.6
    gamma_start: float = 1 / 16
    standardize: str = "dim"
    condition: str = "auto"
    seed: int = 0
    dtype: str = "float32"
    log_every: int = 50
    device: str | None = None
    autocast: str = "auto"
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        self.options  # noqa: B018 -- validates gamma, kinetic, solver, ode_steps and the warm-up
        self.optim_config()  # validates steps, batch_size, lr, lr_schedule, ... , log_every
        check_positive(self.blocks, "blocks", integer=True)
        if self.schedule not in ("joint", "progressive"):
            fail("schedule", "must be 'joint' or 'progressive'", self.schedule)
        if not self.hidden:
            fail("hidden", "must list at least one width", self.hidden)
        for h in self.hidden:
            check_positive(h, "hidden", integer=True)
        ACTIVATIONS.get(self.activation, "activation")
        check_positive(self.time_freqs, "time_freqs", integer=True, allow_zero=True)
        if self.standardize not in ("dim", "scalar", "none", "auto"):
            fail("standardize", "must be 'dim', 'scalar', 'none' or 'auto'", self.standardize)
        if self.condition not in ("auto", "none"):
            fail("condition", "must be 'auto' or 'none'", self.condition)
        check_positive(self.seed, "seed", integer=True, allow_zero=True)
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {sorted(DTYPES)}", self.dtype)
        if self.device is not None and not isinstance(self.device, str):
            fail("device", "must be 'cpu', 'cuda', 'cuda:N', 'auto' or None", self.device)
        if self.autocast not in AUTOCAST:
            fail("autocast", f"must be one of {list(AUTOCAST)}", self.autocast)
        if self.autocast == "bf16" and self.dtype != "float32":
            fail("autocast", "bf16 needs dtype float32", self.autocast)

    @property
    def options(self) -> WorstCaseOptions:
        """The objective's options."""
        return WorstCaseOptions(
            gamma=self.gamma,
            kinetic=self.kinetic,
            solver=self.solver,
            ode_steps=self.ode_steps,
            gamma_warmup=self.gamma_warmup,
            gamma_start=self.gamma_start,
        )

    def optim_config(self) -> OptimConfig:
        """The settings of the one loop for each training phase (per block when progressive)."""
        return OptimConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
        )

    @property
    def spec(self) -> SolverSpec:
        return self.options.spec

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole map (every block's when progressive)."""
        return self.steps * (self.blocks if self.schedule == "progressive" else 1)

    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the objective runs under (``None``: full precision)."""
        return torch.bfloat16 if self.autocast == "bf16" else None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def same_run(self, other: DROConfig) -> dict[str, tuple[Any, Any]]:
        """The keys (but :data:`RUNTIME_KEYS`) where ``other`` differs: ``{key: (other, self)}``."""
        a, b = other.to_json(), self.to_json()
        return {k: (a[k], b[k]) for k in b if k not in RUNTIME_KEYS and a[k] != b[k]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DROConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - known:
            fail(
                "run",
                f"config keys must be among {sorted(known)}",
                sorted(set(d) - known) if isinstance(d, dict) else d,
            )
        # maps saved before these options existed: maps of x alone, trained at a fixed gamma
        old = {"condition": "none", "gamma_warmup": 0.0}
        return cls(**{**old, **d, "hidden": tuple(d.get("hidden", cls.hidden))})
