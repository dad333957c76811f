"""Flow matching / rectified flow (Lipman et al. arXiv 2210.02747; Liu et al. arXiv 2209.03003;
Albergo & Vanden-Eijnden arXiv 2209.15571), with minibatch-OT couplings (Tong et al. arXiv 2302.00482).

One block carries data (``s = 0``) to ``N(0, I)`` (``s = 1``). Loss:
``E_s E_(x0, x1) || v(x_s, s) - dx_s/ds ||^2`` with ``x0`` data, ``x1`` noise drawn with the chosen
coupling and ``s ~ p(s)`` (uniform by default; see :class:`iterflow.core.paths.TimeSampler`); its
minimiser is ``v*(x, s) = E[dx_s/ds | x_s = x]`` for every density ``p`` with full support.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.core.conditioning import bound_rows
from iterflow.core.coupled_batches import CoupledBatches
from iterflow.core.couplings import (
    COUPLINGS,
    OT_SOLVERS,
    compiled_pairing,
    couple,
    pairing_environment,
)
from iterflow.core.distributed import local_rows
from iterflow.core.flow import Flow
from iterflow.core.guidance import LABEL_KEY
from iterflow.core.paths import INTERPOLANTS, TimeSampler, get_interpolant
from iterflow.errors import check_choice, check_positive
from iterflow.methods.base import Loss, Method, MethodOptions, StageData


@dataclass(frozen=True)
class TimeOptions(MethodOptions):
    """The density of the training times, shared by flow matching and local flow matching (whose
    blocks are flow-matching blocks).

    Attributes:
        time_sampling: ``uniform``, ``logit-normal`` (``sigmoid(time_loc + time_scale z)``) or
            ``power`` (``u^time_power``, leaning to the data end for ``time_power > 1``); see
            :class:`iterflow.core.paths.TimeSampler`.
        time_loc, time_scale: the logit-normal's mean and standard deviation of ``logit(s)``.
        time_power: the exponent of ``power``.
        time_mix: fraction of uniform times mixed into a non-uniform density (0: none).
        time_weighting: ``none`` (each density has the same minimiser as uniform times), or
            ``importance`` (rows weighted by ``1 / p(s)``: the expected loss is the uniform one).
    """

    time_sampling: str = "uniform"
    time_loc: float = 0.0
    time_scale: float = 1.0
    time_power: float = 1.0
    time_weighting: str = "none"
    time_mix: float = 0.0

    def __post_init__(self) -> None:
        self.time_sampler()  # validates the time options

    def time_fields(self) -> dict[str, Any]:
        """The time options by name (to hand them on to another :class:`TimeOptions`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TimeOptions)
                if f.name.startswith("time_")}  # fmt: skip

    def time_sampler(self) -> TimeSampler:
        """The density of the training times these options describe (validates them). One
        instance per setting (frozen, so it may be shared): the loss asks for it every step."""
        return _time_sampler(
            self.time_sampling,
            self.time_loc,
            self.time_scale,
            self.time_power,
            self.time_weighting,
            self.time_mix,
        )


@functools.lru_cache(maxsize=64)
def _time_sampler(
    kind: str, loc: float, scale: float, power: float, weighting: str, mix: float
) -> TimeSampler:
    return TimeSampler(kind, loc, scale, power, weighting, mix)


@dataclass(frozen=True)
class FMOptions(TimeOptions):
    """Options of flow matching.

    Attributes:
        interpolant: ``straight`` (rectified flow) or ``trig``.
        coupling: ``independent``, ``ot`` (minibatch OT) or ``sinkhorn``.
        ot_chunk: solve the minibatch OT on chunks of this many rows (0: the whole batch, or with
            ``ot_solver=auto`` the whole batch up to 128 rows and chunks of about 48 rows above).
        ot_solver: ``auto``, ``emd`` (POT) or ``lsa`` (scipy); every (chunk's) solve is exact.
            ``auto`` (see :func:`iterflow.core.couplings.ot_permutation`) costs a few ms per 1,024 rows
            (1-2 ms compiled, with numba, in one or two dimensions:
            :func:`iterflow.core.couplings.compiled_pairing`) and pairs within about 1.07x the
            exact whole-batch transport cost on 2-D data at 256-2,048 rows; ``emd`` on the whole
            batch costs ~0.1 s at 1,024 rows and grows cubically.
        ot_refine: local improvement passes after a chunked OT solve (each lowers the transport cost
            toward the whole-batch optimum; see :func:`iterflow.core.couplings.refine_assignment`;
            0 with ``auto``: its default, :func:`iterflow.core.couplings.auto_stages`).
        sigma: standard deviation of Gaussian noise added around the path (0: none).
        time_*: the density of the training times (:class:`TimeOptions`).
    """

    interpolant: str = "straight"
    coupling: str = "independent"
    ot_chunk: int = 0
    ot_solver: str = "auto"
    ot_refine: int = 0
    sigma: float = 0.0

    def __post_init__(self) -> None:
        INTERPOLANTS.get(self.interpolant, "interpolant")
        COUPLINGS.get(self.coupling, "coupling")
        check_choice(self.ot_solver, OT_SOLVERS, "ot_solver")
        check_positive(self.ot_chunk, "ot_chunk", integer=True, allow_zero=True)
        check_positive(self.ot_refine, "ot_refine", integer=True, allow_zero=True)
        check_positive(self.sigma, "sigma", allow_zero=True)
        super().__post_init__()


def inline_pairing(options: FMOptions, particles: Tensor) -> bool:
    """Whether the OT pairing of a run on ``particles`` is better done in line, before each step,
    than in a background thread: on the CPU with the compiled pairing (``ot_solver=auto`` with its
    own chunks and passes, rows of at most two numbers, numba installed). There the background
    thread would cost the step one of its threads for a pairing that takes a fraction of the step
    (``benchmarks/bench_speed.py``'s OT row measures the result against independent pairs)."""
    dim = math.prod(particles.shape[1:])
    o = options
    return particles.device.type == "cpu" and compiled_pairing(
        dim, o.ot_solver, o.ot_chunk, o.ot_refine
    )


def flow_matching_loss(
    block_velocity: torch.nn.Module,
    x0: Tensor,
    x1: Tensor,
    options: FMOptions,
    generator: torch.Generator,
) -> Loss:
    """Flow-matching regression loss between paired ends ``x0`` (s = 0) and ``x1`` (s = 1).

    ``L = mean_i || v(x_{s_i}, s_i) - dx_s/ds (x0_i, x1_i) ||^2`` over the rows and entries of the
    batch ``(B, *E)``, returned per row (the mean over each row's entries). The coupling, the times and
    the path noise are drawn for the whole batch; the network then runs only on this process's rows
    (:func:`iterflow.core.distributed.local_rows`: all rows outside data-parallel training), so ranks
    that share the generator's seed reproduce one process's update exactly. With class labels
    bound (:func:`iterflow.core.conditioning.conditioning`), an OT coupling pairs rows only within
    their class (``couple``'s ``groups``), so that each class keeps ``N(0, I)`` noise.
    """
    labels = bound_rows(x0.shape[0]).get(LABEL_KEY) if options.coupling != "independent" else None
    x0, x1 = couple(
        x0,
        x1,
        options.coupling,
        chunk=options.ot_chunk,
        ot_solver=options.ot_solver,
        refine=options.ot_refine,
        generator=generator,
        groups=labels,
    )
    n = x0.shape[0]
    s, weight = options.time_sampler().sample(n, generator, x0.device, x0.dtype)
    path = get_interpolant(options.interpolant).sample(x0, x1, s)
    xs = path.x
    if options.sigma > 0:
        xs = xs + options.sigma * torch.randn(
            xs.shape, generator=generator, device=xs.device, dtype=xs.dtype
        )
    rows = local_rows(n)
    err = block_velocity(xs[rows], s[rows]) - path.dx[rows]
    per_row = err.pow(2).flatten(1).mean(1)  # (b,) mean over the entries of each row
    terms = {"fm": per_row.detach()}
    if weight is not None:  # importance weights 1 / p(s): the uniform-time loss in expectation
        per_row = per_row * weight[rows].to(per_row.dtype)
    return Loss(per_row, n, terms)


class FlowMatching(Method):
    """Flow matching from data to ``N(0, I)`` in one block (end to end)."""

    name = "fm"
    Options = FMOptions
    progressive = False
    max_blocks = 1
    # the demo's 6,000 steps on the checkerboard (benchmarks/bench_speed.py --demo-change; issue 14):
    # test NLL gap to log 32 0.191 at lr 8e-3 against 0.233 at the library's 4e-3, and 0.144 with
    # times u^3 mixed with 20 % uniform ones (the sharp edges are learnt near the data end). The
    # time density is tuned for the built-in MLP: a one-layer user network trained for 300 steps
    # spreads too wide near the noise end with it (tests/test_api.py), so it is an MLP option.
    recommended = {
        "lr": 8e-3,
        "options": {"time_sampling": "power", "time_power": 3.0, "time_mix": 0.2},
    }
    mlp_options = frozenset({"time_sampling", "time_power", "time_mix"})
    # A first-order regression loss: bf16 autocast of the network keeps its results within
    # tolerance (measured in benchmarks/bench_speed.py), so the trainer's autocast="auto" may use it.
    autocast_safe = True

    _batches: CoupledBatches | None = None
    _paired: FMOptions

    def environment(self) -> dict[str, str]:
        """With the ``ot`` coupling, which implementation pairs the minibatches (``compiled`` or
        ``numpy``, :func:`iterflow.core.couplings.compiled_pairing`): their pairings differ, so a
        run resumed where numba has appeared or gone continues, but not bit for bit."""
        o: FMOptions = self.options  # type: ignore[assignment]
        dim = math.prod(self.event_shape)
        return pairing_environment(o.coupling, dim, o.ot_solver, o.ot_chunk, o.ot_refine)

    def stage_data(
        self, stage: Flow, particles: Tensor, index: int, generator: torch.Generator
    ) -> StageData:
        """The particles; with the ``ot`` coupling a source of coupled pairs
        (:class:`~iterflow.core.coupled_batches.CoupledBatches`): one step ahead in a background
        thread, or, where the compiled pairing serves a CPU run (:func:`inline_pairing`), in line
        before each step, which then keeps all of PyTorch's threads."""
        o: FMOptions = self.options  # type: ignore[assignment]
        if o.coupling != "ot":
            self._batches = None
            return (particles,)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

        def pair(x0: Tensor, x1: Tensor) -> Tensor:
            return couple(
                x0, x1, "ot", chunk=o.ot_chunk, ot_solver=o.ot_solver, refine=o.ot_refine
            )[1]

        ahead = False if inline_pairing(o, particles) else None
        self._batches = CoupledBatches(particles, pair, seed, ahead=ahead)
        self._paired = dataclasses.replace(o, coupling="independent")  # the loss of such pairs
        return self._batches

    def conditioned_stage_data(
        self,
        stage: Flow,
        particles: Tensor,
        index: int,
        generator: torch.Generator,
        cond: Mapping[str, Tensor],
    ) -> tuple[StageData, dict[str, Tensor]]:
        """The particles and their conditioning rows (a conditional run couples each minibatch
        within its classes as it trains: :func:`flow_matching_loss`)."""
        self._batches = None
        return (particles,), dict(cond)

    def start_at(self, step: int) -> None:
        if self._batches is not None:
            self._batches.start_at(step)

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        o: FMOptions = self.options  # type: ignore[assignment]
        x0 = batch[0]
        if len(batch) == 2 and self._batches is not None:  # pairs coupled ahead
            x1, o = batch[1], self._paired
        else:
            x1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return flow_matching_loss(stage.blocks[0], x0, x1, o, generator)  # type: ignore[arg-type]
