"""The interface every training method implements; the trainer (:mod:`iterflow.train`) drives it.

A method trains *stages*: a stage is a group of blocks optimised together on particles that the
earlier stages have already pushed. Progressive methods (JKO-flow, local flow matching) train one block
per stage; end-to-end methods (flow matching, CNF) have a single stage.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from iterflow.core.distributed import DistContext, row_mean
from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import fail


@dataclass
class Loss:
    """Per-row values of a minibatch loss; the loop (:func:`iterflow.train.loop.optimize`) reduces them.

    Attributes:
        rows: ``(b,)`` the loss of each of this process's rows (all rows outside data-parallel
            training; :func:`iterflow.core.distributed.local_rows`). The objective is their mean
            over the global batch.
        n: the number of rows of the global batch.
        terms: named ``(b,)`` per-row parts to log (reduced the same way).
        extra: an optional scalar added once (not per row), e.g. a penalty on parameters.
    """

    rows: Tensor
    n: int
    terms: dict[str, Tensor] = field(default_factory=dict)
    extra: Tensor | None = None

    def value(self, ctx: DistContext | None = None) -> Tensor:
        """The scalar to differentiate: this rank's share of the global mean (plus ``extra``)."""
        v = row_mean(self.rows, self.n, ctx)
        return v if self.extra is None else v + self.extra

    def __add__(self, other: Loss) -> Loss:
        """The sum of two losses on the same rows (terms merged, the right one winning on a clash)."""
        extra = (
            self.extra
            if other.extra is None
            else (other.extra if self.extra is None else self.extra + other.extra)
        )
        return Loss(self.rows + other.rows, self.n, {**self.terms, **other.terms}, extra)

    def scaled(self, weight: float) -> Loss:
        """The loss times ``weight`` (terms unchanged: they log the unweighted parts)."""
        extra = None if self.extra is None else weight * self.extra
        return Loss(weight * self.rows, self.n, dict(self.terms), extra)


@dataclass(frozen=True)
class MethodOptions:
    """Options shared by all methods (subclass and add fields)."""

    push_solver: str = "rk4"
    push_steps: int = 16

    def push_spec(self) -> SolverSpec:
        return SolverSpec(self.push_solver, self.push_steps)


class Method(ABC):
    """A way to train blocks.

    Subclasses set ``name``, ``Options`` (a frozen dataclass deriving from :class:`MethodOptions`)
    and ``progressive``, and implement :meth:`loss`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    progressive: ClassVar[bool] = True
    max_blocks: ClassVar[int | None] = None
    #: Training settings this method is tuned for: :class:`~iterflow.train.TrainConfig` fields, and
    #: ``options`` merged under the user's, that apply wherever the user leaves a field unset
    #: (``iterflow train``, :meth:`TrainConfig.for_method <iterflow.train.TrainConfig.for_method>`,
    #: :class:`~iterflow.FlowDensity`). Empty: the plain ``TrainConfig`` defaults (flow matching's).
    recommended: ClassVar[dict[str, Any]] = {}

    def __init__(
        self, options: MethodOptions, *, event_shape: tuple[int, ...], num_blocks: int
    ) -> None:
        self.options = options
        self.event_shape = event_shape
        self.num_blocks = num_blocks
        if self.max_blocks is not None and num_blocks > self.max_blocks:
            fail(
                "--blocks",
                f"method {self.name!r} trains at most {self.max_blocks} block(s)",
                num_blocks,
            )

    # -- stages ---------------------------------------------------------------------------------
    def stages(self) -> list[list[int]]:
        """Block indices trained together, in order."""
        if self.progressive:
            return [[i] for i in range(self.num_blocks)]
        return [list(range(self.num_blocks))]

    def stage_data(
        self, stage: Flow, particles: Tensor, index: int, generator: torch.Generator
    ) -> tuple[Tensor, ...]:
        """Tensors whose rows the trainer samples minibatches from (default: the particles)."""
        return (particles,)

    @abstractmethod
    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        """Loss of a minibatch; ``stage`` holds the blocks of stage ``index`` in model units."""

    # -- after a stage ---------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, stage: Flow, x: Tensor, chunk: int = 8192) -> Tensor:
        """Carry particles through the trained stage (default: encode with the push solver)."""
        spec = self.options.push_spec()
        return torch.cat([stage.encode(c, solver=spec) for c in x.split(chunk)]) if len(x) else x

    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        """Extra per-stage figures for the log (the trainer adds movement, time and NFE)."""
        return {}

    def should_stop(self, history: list[dict[str, Any]]) -> bool:
        """Whether to stop adding blocks early (checked after every stage)."""
        return False


def parse_options(cls: type[Method], raw: dict[str, Any]) -> MethodOptions:
    """Build ``cls.Options`` from strings or values, with errors naming the option."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            fail(f"option {key!r}", f"must be one of {sorted(fields)} for method {cls.name!r}", key)
        default = fields[key].default
        kwargs[key] = _coerce(value, default, key)
    try:
        return cls.Options(**kwargs)
    except TypeError as e:
        fail("options", str(e), raw)


def _coerce(value: Any, default: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(float(v) for v in value.split(",") if v)
    except ValueError:
        fail(f"option {key!r}", f"must be a {type(default).__name__}", value)
    return value
