"""Blocks and flows.

Time convention (one for the whole library): every block has its own time ``s`` in ``[0, 1]``.
*Encoding* integrates each block forward, ``s: 0 -> 1``, block 1 first, carrying data toward noise;
*decoding* (sampling) integrates each block backward, ``s: 1 -> 0``, last block first. Papers that put
noise at ``t = 0`` are converted at their boundary (see :mod:`iterflow.paths`).

A :class:`Flow` also holds a fixed affine *normalisation* ``u = (x - shift) / scale`` (recorded from the
training data) so that the blocks work on standardised particles while every public method takes and
returns data in its own units; log-densities include the normalisation's log-Jacobian.

Log-likelihood by the instantaneous change of variables (Chen et al. 2018; FFJORD, arXiv 1810.01367):
``log p(x) = log N(z; 0, I) + sum_n integral_0^1 div v_n(x_n(s), s) ds - sum log scale``.
The path integrals come from the one augmented integrand of the ODE layer,
:mod:`iterflow.core.integrand`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from iterflow.core.conditioning import bound_rows, conditioning
from iterflow.core.guidance import LABEL_KEY, guidance_weight, guided_call
from iterflow.core.guidance import guidance as guiding
from iterflow.core.integrand import draw_probes, integrate_chain, integrate_path
from iterflow.core.ode import SolverSpec, integrate
from iterflow.errors import check_choice, check_finite, fail


class Block(nn.Module):
    """One ODE block ``dx/ds = v(x, s)``, ``s`` in ``[0, 1]``.

    Arguments:
        velocity: a module called as ``velocity(x, s, **cond)`` returning a tensor shaped like ``x``;
            ``s`` is a 0-dim tensor or ``(B,)``; ``cond`` the per-row keyword arguments bound by
            :func:`iterflow.core.conditioning.conditioning` (none outside it); inside
            :func:`iterflow.core.guidance.guidance` a label-conditional velocity is guided.

    Attributes:
        nfe: running count of velocity evaluations (one per batched call); read it through
            :meth:`Flow.count_nfe`.
    """

    velocity: nn.Module

    def __init__(self, velocity: nn.Module) -> None:
        super().__init__()
        self.velocity = velocity
        self.nfe = 0

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        self.nfe += 1
        return guided_call(self.velocity, x, s, bound_rows(x.shape[0]))

    def velocity_and_jacobian_terms(
        self, x: Tensor, s: Tensor, probes: Tensor | None = None, *, frobenius: bool = False
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(v, div, frob)`` in one pass where the velocity offers it (its own
        ``velocity_and_jacobian_terms``, e.g. :class:`~iterflow.core.nn.MLPVelocity`), with the
        bound rows; ``None`` otherwise and for a guided field (the caller then uses autograd)."""
        fused = getattr(self.velocity, "velocity_and_jacobian_terms", None)
        cond = bound_rows(x.shape[0])
        if fused is None or (LABEL_KEY in cond and guidance_weight() not in (None, 1.0)):
            return None
        out = fused(x, s, probes, frobenius=frobenius, **cond)
        self.nfe += out is not None
        return out

    def _field(self, t: Tensor, x: Tensor) -> Tensor:
        return self(x, t)

    def encode(self, x: Tensor, spec: SolverSpec) -> Tensor:
        """Integrate ``s: 0 -> 1``."""
        return integrate(self._field, x, 0.0, 1.0, spec)  # type: ignore[return-value]

    def decode(self, z: Tensor, spec: SolverSpec) -> Tensor:
        """Integrate ``s: 1 -> 0`` (the inverse map up to solver error)."""
        return integrate(self._field, z, 1.0, 0.0, spec)  # type: ignore[return-value]

    def path(self, x: Tensor, spec: SolverSpec, *, reverse: bool = False) -> list[Tensor]:
        """States on the solver's time grid (``spec.steps + 1`` of them)."""
        t0, t1 = (1.0, 0.0) if reverse else (0.0, 1.0)
        return integrate(self._field, x, t0, t1, spec, save_every_step=True)  # type: ignore[return-value]

    def encode_with_divergence(
        self,
        x: Tensor,
        spec: SolverSpec,
        *,
        probes: Tensor | None = None,
        create_graph: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Integrate ``(x, integral of div v)`` over ``s: 0 -> 1`` (the divergence alone of
        :func:`iterflow.core.integrand.integrate_path`).

        Arguments:
            x: ``(B, *E)`` start points.
            spec: solver.
            probes: ``(K, B, *E)`` Hutchinson probes held fixed along the path, or ``None`` for the
                exact trace.
            create_graph: differentiate through the result (training); otherwise results are detached.

        Returns:
            ``(z, int_div)`` with ``int_div`` of shape ``(B,)``.
        """
        r = integrate_path(
            self, x, spec, probes=probes, create_graph=create_graph, kinetic=False, jacobian=False
        )
        return r.z, r.div


@dataclass
class NFECount:
    """Number of velocity evaluations made inside a :meth:`Flow.count_nfe` context."""

    nfe: int = 0


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension, shape ``(B,)``."""
    zf = z.reshape(z.shape[0], -1)
    return -0.5 * (zf**2).sum(1) - 0.5 * zf.shape[1] * math.log(2 * math.pi)


#: ``Flow.log_prob``'s ``autocast`` values and their dtypes.
LIKELIHOOD_AUTOCAST = {"none": None, "bf16": torch.bfloat16}
#: The smallest adaptive tolerance ``log_prob`` accepts under bf16 autocast: its rounding (a
#: relative 4e-3 per product) keeps the error estimate of an adaptive step from falling much below
#: ~1e-4. In ``benchmarks/bench_speed.py --like-parts work-precision`` (2-D, dopri5 with the per-row
#: control) bf16 takes 68 NFE at 1e-3 and 146-152 at 1e-4 against float32's 62 and 92-98; an
#: exploratory run at 1e-5 took over 1,500.
BF16_MIN_TOLERANCE = 1e-4


def likelihood_autocast(autocast: str, spec: SolverSpec, x: Tensor) -> AbstractContextManager[Any]:
    """The ``torch.autocast`` context of ``log_prob(..., autocast=...)`` (a no-op for
    ``"none"``), after checking the choice, the dtype and the tolerances."""
    check_choice(autocast, LIKELIHOOD_AUTOCAST, "autocast")
    dtype = LIKELIHOOD_AUTOCAST[autocast]
    if dtype is None:
        return nullcontext()
    if x.dtype != torch.float32:
        fail("autocast", f"{autocast} needs float32 points and flow", str(x.dtype))
    if spec.adaptive and min(spec.atol, spec.rtol) < BF16_MIN_TOLERANCE:
        fail(
            "autocast",
            f"{autocast} needs atol and rtol >= {BF16_MIN_TOLERANCE:g} with an adaptive solver "
            "(its rounding keeps the error estimate above smaller tolerances: the steps would "
            "multiply); use autocast='none' for tighter tolerances",
            (spec.atol, spec.rtol),
        )
    return torch.autocast(x.device.type, dtype=dtype)


class Flow(nn.Module):
    """A chain of ODE blocks between data and a standard normal.

    Arguments:
        blocks: the blocks in encoding order (data side first).
        event_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 28, 28)``.
        shift, scale: the normalisation ``u = (x - shift) / scale``, broadcastable to
            ``event_shape`` (default: identity).

    Every map takes ``solver`` (a name or a :class:`~iterflow.ode.SolverSpec`), and ``steps``,
    ``atol``, ``rtol`` when a name is given; ``steps`` counts fixed steps *per block*.

    Example:
        >>> from iterflow.core.nn import MLPVelocity
        >>> flow = Flow([Block(MLPVelocity(2, hidden=(16,)))], (2,))
        >>> x = flow.sample(4, generator=torch.Generator().manual_seed(0), solver="rk4", steps=4)
        >>> flow.log_prob(x, solver="rk4", steps=4).shape
        torch.Size([4])
    """

    blocks: nn.ModuleList
    shift: Tensor  # buffers (normalisation), declared for type checkers
    scale: Tensor

    def __init__(
        self,
        blocks: Sequence[Block],
        event_shape: Sequence[int],
        *,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.event_shape = tuple(int(s) for s in event_shape)
        shift = torch.zeros(self.event_shape) if shift is None else torch.as_tensor(shift)
        scale = torch.ones(self.event_shape) if scale is None else torch.as_tensor(scale)
        if not shift.is_floating_point():
            shift = shift.float()
        if not scale.is_floating_point():
            scale = scale.float()
        if bool((scale <= 0).any()) or not bool(torch.isfinite(scale).all()):
            fail("scale", "must be finite and > 0 everywhere", scale)
        self.register_buffer("shift", torch.broadcast_to(shift, self.event_shape).clone())
        self.register_buffer("scale", torch.broadcast_to(scale, self.event_shape).clone())

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def chain(self) -> list[Block]:
        """The blocks in encoding order, typed (``self.blocks`` is a ``ModuleList``)."""
        return cast("list[Block]", list(self.blocks))

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        """Classes of a label-conditional flow (its first block's ``num_classes``; 0: none)."""
        if not len(self.blocks):
            return 0
        return int(getattr(self.chain[0].velocity, "num_classes", 0) or 0)

    def _like(self) -> Tensor:
        return self.shift

    @contextmanager
    def count_nfe(self) -> Iterator[NFECount]:
        """Count velocity evaluations of every block inside the ``with`` body.

        Example:
            >>> from iterflow.core.nn import MLPVelocity
            >>> flow = Flow([Block(MLPVelocity(2, hidden=(8,)))], (2,))
            >>> with flow.count_nfe() as c:
            ...     z = flow.encode(torch.zeros(3, 2), solver="rk4", steps=2)
            >>> c.nfe  # 2 RK4 steps of 4 evaluations
            8
        """
        start = sum(b.nfe for b in self.chain)
        counter = NFECount()
        try:
            yield counter
        finally:
            counter.nfe = sum(b.nfe for b in self.chain) - start

    def compiled(self, **options: Any) -> Flow:
        """This flow with every velocity network run through ``torch.compile``, its one-pass
        Jacobian terms included (:class:`~iterflow.core.nn.compiled.CompiledVelocity`).

        A view: its blocks share the networks' parameters with this flow (training one trains the
        other; this flow is what gets saved) and it holds a copy of the normalisation. The first
        call per input shape compiles (seconds); shapes are static by default, so evaluate in
        batches of one size. Worth it where many small operations dominate: the exact-trace
        likelihood of an MLP flow (``benchmarks/bench_speed.py``, section ``likelihood``, the
        ``compiled`` rows) and the CNF / JKO-flow losses (``TrainConfig(compile=True)``).

        Arguments:
            options: keyword arguments of ``torch.compile`` (default ``dynamic=False``).

        Example (not run: compilation takes seconds)::

            fast = flow.compiled()
            with torch.no_grad():
                nll = -fast.log_prob(x)  # the same values as flow.log_prob(x), to rounding
        """
        from iterflow.core.nn.compiled import CompiledVelocity

        blocks = [Block(CompiledVelocity(b.velocity, **options)) for b in self.chain]
        view = Flow(blocks, self.event_shape, shift=self.shift, scale=self.scale)
        return view.to(device=self.shift.device, dtype=self.shift.dtype)

    def _check(self, x: Tensor, argument: str) -> Tensor:
        if not isinstance(x, Tensor):
            fail(argument, "must be a torch.Tensor", type(x).__name__)
        if tuple(x.shape[1:]) != self.event_shape or x.ndim != len(self.event_shape) + 1:
            fail(
                argument,
                f"must have shape (batch, {', '.join(map(str, self.event_shape))})",
                tuple(x.shape),
            )
        if x.device != self.shift.device:
            fail(argument, f"must be on the flow's device {self.shift.device}", str(x.device))
        check_finite(x, argument)
        if not x.is_floating_point():
            x = x.to(self.shift.dtype)
        return x

    @staticmethod
    def _spec(solver: str | SolverSpec, steps: int, atol: float, rtol: float) -> SolverSpec:
        if isinstance(solver, SolverSpec):
            return solver
        return SolverSpec(solver, steps, atol, rtol)

    def normalize(self, x: Tensor) -> Tensor:
        """Data units -> model units."""
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def denormalize(self, u: Tensor) -> Tensor:
        """Model units -> data units."""
        return u * self.scale.to(u.dtype) + self.shift.to(u.dtype)

    def normalization_log_det(self) -> Tensor:
        """``log |det d u / d x| = -sum log scale`` (a scalar)."""
        return -self.scale.log().sum()

    def _select(self, blocks: slice | None) -> Sequence[Block]:
        return self.chain if blocks is None else self.chain[blocks]

    # -- maps -----------------------------------------------------------------------------------
    def encode(
        self,
        x: Tensor,
        *,
        solver: str | SolverSpec = "dopri5",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> Tensor:
        """Data -> noise: normalise, then integrate every block forward. Shape ``(B, *E)``."""
        spec = self._spec(solver, steps, atol, rtol)
        u = self.normalize(self._check(x, "x"))
        for b in self.chain:
            u = b.encode(u, spec)
        return u

    def decode(
        self,
        z: Tensor,
        *,
        solver: str | SolverSpec = "dopri5",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> Tensor:
        """Noise -> data: integrate every block backward (last first), then de-normalise."""
        spec = self._spec(solver, steps, atol, rtol)
        u = self._check(z, "z")
        for b in reversed(self.chain):
            u = b.decode(u, spec)
        return self.denormalize(u)

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        solver: str | SolverSpec = "dopri5",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        labels: Tensor | int | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """Draw ``n`` samples in data units: decode ``z ~ N(0, I)``.

        Arguments:
            n: number of samples.
            generator: randomness of ``z``.
            solver, steps, atol, rtol: integration.
            labels: class labels of a label-conditional flow: one label for all samples, or
                ``(n,)`` integers in ``[0, num_classes]`` (``num_classes``: the null label);
                ``None``: the null label (the unconditional field).
            guidance: classifier-free guidance weight ``w`` (:mod:`iterflow.core.guidance`;
                1 or ``None``: conditional, 0: unconditional).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            fail("n", "must be a positive integer", n)
        like = self._like()
        cond = self._labels(labels, n, guidance)
        gdev = generator.device if generator is not None else like.device
        z = torch.randn((n, *self.event_shape), generator=generator, device=gdev, dtype=like.dtype)
        bound = conditioning(**cond) if cond else nullcontext()  # else: any outer binding
        with bound, guiding(guidance) if guidance is not None else nullcontext():
            return self.decode(z.to(like.device), solver=solver, steps=steps, atol=atol, rtol=rtol)

    def _labels(
        self, labels: Tensor | int | None, n: int, weight: float | None
    ) -> dict[str, Tensor]:
        """The conditioning of :meth:`sample`: ``{"y": (n,) labels}`` or ``{}``, checked."""
        k = self.num_classes
        if (labels is not None or weight is not None) and k == 0:
            name = "labels" if labels is not None else "guidance"
            fail(name, "need a label-conditional flow (trained with class labels)", "no classes")
        if labels is None:
            return {}
        y = torch.as_tensor(labels, device=self.shift.device)
        if y.ndim == 0:
            y = y.expand(n)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != (n,):
            fail("labels", f"must be one integer or {n} integers (n,)", tuple(y.shape))
        if int(y.min()) < 0 or int(y.max()) > k:
            fail("labels", f"must lie in [0, {k}) (or {k}: no class)", (int(y.min()), int(y.max())))
        return {LABEL_KEY: y.long()}

    def log_prob(
        self,
        x: Tensor,
        *,
        divergence: str = "auto",
        probes: int = 1,
        probe_kind: str = "rademacher",
        generator: torch.Generator | None = None,
        solver: str | SolverSpec = "dopri5",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        autocast: str = "none",
    ) -> Tensor:
        """Log density of ``x`` (data units) by the instantaneous change of variables.

        Arguments:
            x: ``(B, *E)`` points.
            divergence: ``"exact"`` (trace by autograd, one vector-Jacobian product per dimension),
                ``"hutchinson"`` (``probes`` random probes held fixed along each path, seeded by
                ``generator``), or ``"auto"`` (the one rule of
                :func:`iterflow.core.integrand.resolve_divergence`: exact up to
                :data:`~iterflow.core.integrand.EXACT_DIVERGENCE_MAX_DIM` = 16 entries per sample).
            probes, probe_kind: Hutchinson probes (``"rademacher"`` or ``"gaussian"``).
            generator: randomness of the probes.
            solver, steps, atol, rtol: integration. For per-point scores pass
                ``solver=SolverSpec("dopri5", atol=..., rtol=..., error_norm="rows")``: every row is
                then held to the tolerance, not only the batch's RMS error (a little more NFE).
            autocast: ``"none"`` or ``"bf16"``: the velocity networks under bfloat16
                ``torch.autocast`` (the ODE state and the integrated divergence stay in the flow's
                float32; an :class:`~iterflow.core.nn.MLPVelocity` keeps its input layer and,
                without a gradient, its output layer unrounded: :mod:`iterflow.core.nn.precision`).
                For loose tolerances on hardware with fast bf16 products: its rounding floors the
                mean per-point error near 1.5e-3 nats in 2-D and 5e-3 in 10-D and moves the mean
                NLL by up to 2e-2 in 32-64-D (``benchmarks/bench_speed.py --like-parts
                work-precision``), so an adaptive solver needs ``atol, rtol >= 1e-4`` (below, its
                error estimate never meets the tolerance and the steps multiply; refused).

        Returns:
            ``(B,)`` log densities in nats. When grad mode is on the result is differentiable
            (maximum-likelihood training); otherwise it is computed without keeping a graph.
        """
        x = self._check(x, "x")
        spec = self._spec(solver, steps, atol, rtol)
        amp = likelihood_autocast(autocast, spec, x)
        u = self.normalize(x)
        eps = draw_probes(u, divergence, probes, probe_kind, generator)
        with amp:
            r = integrate_chain(
                list(self.blocks),
                u,
                spec,
                probes=eps,
                create_graph=torch.is_grad_enabled(),
                kinetic=False,
                jacobian=False,
            )
        return standard_normal_log_prob(r.z) + r.div + self.normalization_log_det().to(u.dtype)

    def encode_by_block(
        self,
        x: Tensor,
        *,
        solver: str | SolverSpec = "dopri5",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> list[Tensor]:
        """Model-unit particles before the first block and after each block (``num_blocks + 1``)."""
        spec = self._spec(solver, steps, atol, rtol)
        u = self.normalize(self._check(x, "x"))
        out = [u]
        for b in self.chain:
            u = b.encode(u, spec)
            out.append(u)
        return out

    def trajectory(
        self,
        x: Tensor,
        *,
        direction: str = "decode",
        solver: str | SolverSpec = "rk4",
        steps: int = 16,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> Tensor:
        """Paths through the whole chain, in data units, shape ``(num_blocks * steps + 1, B, *E)``.

        Arguments:
            x: start points: data for ``direction="encode"``, noise for ``"decode"``.
            direction: ``"encode"`` (data -> noise) or ``"decode"`` (noise -> data).
        """
        if direction not in ("encode", "decode"):
            fail("direction", "must be 'encode' or 'decode'", direction)
        spec = self._spec(solver, steps, atol, rtol)
        x = self._check(x, "x")
        if direction == "encode":
            u, blocks, rev = self.normalize(x), self.chain, False
        else:
            u, blocks, rev = x, list(reversed(self.chain)), True
        states = [u]
        for b in blocks:
            path = b.path(states[-1], spec, reverse=rev)
            states.extend(path[1:])
        return self.denormalize(torch.stack(states))
