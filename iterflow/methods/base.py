"""The interface every training method implements; the trainer (:mod:`iterflow.train`) drives it.

A method trains *stages*: a stage is a group of blocks optimised together on particles that the
earlier stages have already pushed. Progressive methods (JKO-flow, local flow matching) train one block
per stage; end-to-end methods (flow matching, CNF) have a single stage.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import fail


@dataclass
class Loss:
    """A training loss and the named terms to log (detached scalars)."""

    value: Tensor
    terms: dict[str, Tensor]


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
