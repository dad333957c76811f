"""The interface every training method implements; the trainer (:mod:`iterflow.train`) drives it.

A method trains *stages*: a stage is a group of blocks optimised together on particles that the
earlier stages have already pushed. Progressive methods (JKO-flow, local flow matching) train one block
per stage; end-to-end methods (flow matching, CNF) have a single stage.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from iterflow.core.coerce import coerce_fields, field_types, to_json_value
from iterflow.core.distributed import DistContext, row_mean
from iterflow.core.flow import Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError, fail

#: What a stage trains on: tensors whose rows are sampled, or ``draw(generator, batch_size)``.
StageData = tuple[Tensor, ...] | Callable[[torch.Generator, int], tuple[Tensor, ...]]


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
    #: Names of ``recommended["options"]`` tuned for the capacity of the built-in MLP; they are left
    #: out with another network (a user's velocity module, the U-Net), like the non-option fields.
    mlp_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, options: MethodOptions, *, event_shape: tuple[int, ...], num_blocks: int
    ) -> None:
        self.options = options
        self.event_shape = event_shape
        self.num_blocks = num_blocks
        if self.max_blocks is not None and num_blocks > self.max_blocks:
            fail(
                "blocks",
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
    ) -> StageData:
        """Tensors whose rows the trainer samples minibatches from (default: the particles), or a
        function ``draw(generator, batch_size)`` returning minibatches (it may have a ``close()``
        that the loop calls at the end of the stage)."""
        return (particles,)

    def conditioned_stage_data(
        self,
        stage: Flow,
        particles: Tensor,
        index: int,
        generator: torch.Generator,
        cond: Mapping[str, Tensor],
    ) -> tuple[StageData, dict[str, Tensor]]:
        """:meth:`stage_data` of a conditioned run, with the conditioning rows of its tensors.

        Arguments:
            cond: the rows of the particles: name -> ``(n, ...)`` (class labels ``y``, ...).

        Returns:
            ``(tensors, rows)``: the tensors the trainer samples minibatches from and their
            conditioning rows (the trainer draws the same row indices of all of them). Default:
            the particles and ``cond`` itself. Methods whose tensors are not the particles
            (reflow, distillation: simulated pairs) override it and give their tensors' own rows.

        Raises:
            InputError: (argument ``cond``) a method whose :meth:`stage_data` is not the particles
                and that does not override this method.
        """
        if not self.accepts_cond():
            fail(
                "cond",
                f"is not supported by method {self.name!r} (its minibatches are not data rows)",
                sorted(cond),
            )
        return self.stage_data(stage, particles, index, generator), dict(cond)

    @classmethod
    def accepts_cond(cls) -> bool:
        """Whether runs of this method may be conditioned (see :meth:`conditioned_stage_data`)."""
        return (
            cls.stage_data is Method.stage_data
            or cls.conditioned_stage_data is not Method.conditioned_stage_data
        )

    def environment(self) -> dict[str, str]:
        """What besides the saved state and PyTorch's version decides this method's steps (names to
        short strings; default: nothing). A run resumed where it differs is warned that it will not
        repeat the interrupted run bit for bit (:class:`iterflow.train.ResumeWarning`)."""
        return {}

    def start_at(self, step: int) -> None:
        """Called before a stage's first step with the step it starts from (0, or the checkpoint's
        step after a resume); methods whose state depends on the step restore it here."""
        del step  # most methods keep no step-dependent state

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

    def reject_stage(self, record: dict[str, Any]) -> bool:
        """Whether to drop the stage just trained, from its record (its losses, movement and
        :meth:`stage_report` figures on the validation particles), and end the chain before it.
        The trainer then neither adds nor saves its blocks; it keeps the record as the run's
        ``rejected`` entry (its time counts), and a resumed run stops there too."""
        del record
        return False


def parse_options(cls: type[Method], raw: Mapping[str, Any]) -> MethodOptions:
    """``cls.Options`` from text (``-o gamma=0.5``) or values, each coerced once by its field's
    annotated type (:func:`iterflow.core.coerce.coerce`); errors name the option (``option 'gamma'``).

    Example:
        >>> from iterflow.methods import METHODS
        >>> parse_options(METHODS["local-fm"], {"hs": "0.1,0.2", "final_block": "false"}).hs
        (0.1, 0.2)
    """
    kwargs = _coerced(cls, raw)
    try:
        return cls.Options(**kwargs)
    except InputError as e:
        if e.argument in field_types(cls.Options):  # a field's own check: name it as an option
            raise InputError(f"option {e.argument!r}", e.rule, e.value) from None
        raise
    except TypeError as e:
        fail("options", str(e), dict(raw))


def typed_options(cls: type[Method], raw: Mapping[str, Any]) -> dict[str, Any]:
    """The options given in ``raw``, coerced to their typed values in JSON form (tuples as lists)
    and validated together by building ``cls.Options``: what a saved configuration records, so that
    text from the command line and values from Python give one configuration (and one hash).

    Example:
        >>> from iterflow.methods import METHODS
        >>> typed_options(METHODS["jko"], {"gamma": "1", "substeps": "2"})
        {'gamma': 1.0, 'substeps': 2}
    """
    parse_options(cls, raw)
    return to_json_value(_coerced(cls, raw))


def options_record(options: MethodOptions) -> dict[str, Any]:
    """Every field of ``options`` (given or default) in JSON form, for a run's manifest."""
    return to_json_value(dataclasses.asdict(options))


def _coerced(cls: type[Method], raw: Mapping[str, Any]) -> dict[str, Any]:
    return coerce_fields(
        field_types(cls.Options),
        raw,
        lambda key: f"option {key!r}",
        name="options",
        owner=f" for method {cls.name!r}",
    )
