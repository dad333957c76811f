"""Per-row log-densities of a trained flow: the scores of ``iterflow score`` (anomaly detection).

:func:`score_rows` gives one value per row of a tensor: the log-density in nats, or bits/dim on
request, by the exact trace or by Hutchinson's estimator with a per-row standard error over the
probes. :func:`log_density_rows` is the one chunked loop over :meth:`Flow.log_prob` behind it, the
test NLL of ``iterflow eval`` (:func:`iterflow.evaluation.evaluate.nll_per_sample`), bits/dim of
images and :meth:`iterflow.FlowDensity.score_samples`.

Example:
    >>> import torch
    >>> from iterflow.core.flow import Block, Flow
    >>> from iterflow.core.nn import MLPVelocity
    >>> flow = Flow([Block(MLPVelocity(2, hidden=(8,)))], (2,))
    >>> r = score_rows(flow, torch.zeros(3, 2), divergence="exact", solver="rk4", steps=2)
    >>> r.values.shape, r.stderr, r.units
    (torch.Size([3]), None, 'nats')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Flow, likelihood_autocast
from iterflow.core.integrand import PROBE_KINDS, resolve_divergence
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_choice, check_positive, fail

__all__ = ["ScoreResult", "check_rows", "log_density_rows", "score_rows"]

#: ``progress(rows_done, rows_total)``, called after each chunk.
Progress = Callable[[int, int], None]

_SHOWN_ROWS = 5  # bad rows listed in an error message


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`score_rows` returns.

    Attributes:
        values: ``(n,)`` float64 (CPU), one score per row in ``units``: the log-density
            ``log p(x_i)`` in nats (higher = more typical), or with ``units == "bits/dim"`` the
            negative log-likelihood ``-log p(x_i) / (d ln 2)`` (lower = more typical).
        stderr: ``(n,)`` standard error of each value over the Hutchinson probes (the sample
            standard deviation of the ``K`` estimates, ``K - 1`` in its denominator, over
            ``sqrt(K)``; same units), or ``None`` for the exact trace.
        units: ``"nats"`` or ``"bits/dim"``.
        divergence: the trace estimator used, ``"exact"`` or ``"hutchinson"`` (``auto`` resolved).
        probes: Hutchinson probes per row (``None`` for the exact trace).
        nfe: velocity evaluations spent (one per batched call).
    """

    values: Tensor
    stderr: Tensor | None
    units: str
    divergence: str
    probes: int | None
    nfe: int

    @property
    def name(self) -> str:
        """Column name of :attr:`values`: ``"log_density"`` or ``"bits_per_dim"``."""
        return "bits_per_dim" if self.units == "bits/dim" else "log_density"

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: rows, units, estimator, mean/min/max and the median stderr."""
        v = self.values
        return {
            "n": int(v.numel()),
            "units": self.units,
            "divergence": self.divergence,
            "probes": self.probes,
            "mean": float(v.mean()),
            "min": float(v.min()),
            "max": float(v.max()),
            "median_stderr": None if self.stderr is None else float(self.stderr.median()),
            "nfe": self.nfe,
        }


def check_rows(x: Any, event_shape: tuple[int, ...], argument: str = "x") -> Tensor:
    """``x`` as ``(n, *event_shape)`` rows, checked before any computation.

    Accepted shapes: ``(n, *event_shape)``, flattened rows ``(n, d)`` with ``d = prod(event_shape)``,
    and ``(n,)`` when ``event_shape == (1,)``. NumPy arrays are converted (never copied twice).

    Raises:
        InputError: (naming ``argument``) not a real tensor or array, no rows, rows of the wrong
            width, or rows holding NaN/inf (the message names the first bad row indices).

    Example:
        >>> check_rows(torch.zeros(4, 6), (2, 3)).shape
        torch.Size([4, 2, 3])
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or not (
            np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
        ):
            fail(argument, "must hold real numbers (integer or floating dtype)", str(x.dtype))
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        fail(argument, "must be a torch.Tensor or numpy array of rows", type(x).__name__)
    if x.dtype == torch.bool or x.is_complex():
        fail(argument, "must hold real numbers", str(x.dtype))
    dim = math.prod(event_shape)
    shown = ", ".join(map(str, event_shape))
    if x.ndim == 0 or x.shape[0] == 0:
        fail(argument, "must hold at least one row", tuple(x.shape))
    if tuple(x.shape[1:]) == tuple(event_shape):
        pass
    elif (x.ndim == 2 and x.shape[1] == dim) or (x.ndim == 1 and dim == 1):
        x = x.reshape(x.shape[0], *event_shape)
    else:
        width = math.prod(x.shape[1:]) if x.ndim > 1 else 1
        shapes = f"(n, {dim})" if len(event_shape) == 1 else f"(n, {dim}) or (n, {shown})"
        fail(
            argument,
            f"must have rows of {dim} values like the flow's samples (shape {shapes})",
            f"shape {tuple(x.shape)}, {width} values per row",
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0]
        r0 = int(rows[0])
        first = x[r0].reshape(-1)
        col = int((~torch.isfinite(first)).nonzero()[0, 0])
        where = f"row {r0}, column {col}: {float(first[col])}"
        if len(rows) > 1:
            listed = ", ".join(str(int(i)) for i in rows[:_SHOWN_ROWS])
            more = ", ..." if len(rows) > _SHOWN_ROWS else ""
            where = f"{len(rows)} rows ({listed}{more}); {where}"
        fail(argument, "must hold only finite values (NaN or inf in a row)", where)
    return x


def _repeat(rows: Tensor, times: int) -> Tensor:
    """``(b, ...)`` rows stacked ``times`` times: ``(times * b, ...)``, probe-major."""
    return (
        rows.unsqueeze(0).expand(times, *rows.shape).reshape(times * rows.shape[0], *rows.shape[1:])
    )


def _bound(
    cond: Mapping[str, Tensor] | None, start: int, rows: int, times: int
) -> AbstractContextManager[None]:
    """Bind rows ``start : start + rows`` of ``cond`` (each repeated ``times`` times), or nothing."""
    if not cond:
        return nullcontext()
    return conditioning(**{k: _repeat(v[start : start + rows], times) for k, v in cond.items()})


def log_density_rows(
    flow: Flow,
    x: Tensor,
    *,
    spec: SolverSpec,
    divergence: str = "auto",
    probes: int = 1,
    probe_kind: str = "rademacher",
    generator: torch.Generator | None = None,
    chunk: int = 4096,
    per_probe: bool = False,
    progress: Progress | None = None,
    cond: Mapping[str, Tensor] | None = None,
    autocast: str = "none",
) -> tuple[Tensor, int]:
    """``log p(x_i)`` in nats by :meth:`Flow.log_prob`, ``chunk`` rows at a time, without a graph.

    Arguments:
        flow: the flow; x: ``(n, *E)`` rows on the flow's device (checked by ``log_prob``).
        spec: the solver; divergence, probes, probe_kind, generator: as in :meth:`Flow.log_prob`
            (one generator for all chunks, so the probes depend on ``chunk``).
        chunk: largest batch handed to the solver.
        per_probe: with Hutchinson's estimator, keep the ``K = probes`` estimates of each row apart:
            every row is repeated ``K`` times with one probe each (``chunk // K`` rows per call)
            and the result is ``(K, n)``. Ignored (result ``(n,)``) when the trace is exact.
        progress: called with ``(rows_done, n)`` after each chunk.
        cond: per-row conditioning ``name -> (n, ...)`` tensors (e.g. class labels ``y``), bound
            chunk by chunk (:func:`iterflow.core.conditioning.conditioning`) with the rows they
            belong to (repeated with the rows when ``per_probe`` splits the probes).
        autocast: ``"none"`` or ``"bf16"`` (:meth:`Flow.log_prob`).

    Returns:
        ``(values, nfe)``: float64 log-densities on ``x``'s device, ``(n,)`` (``(K, n)`` with
        ``per_probe`` and Hutchinson), and the number of velocity evaluations.
    """
    check_positive(chunk, "chunk", integer=True)
    n = x.shape[0]
    split = per_probe and resolve_divergence(divergence, flow.dim) == "hutchinson"
    vals = []
    done = 0
    with flow.count_nfe() as c, torch.no_grad():
        if not split:
            for start, part in zip(range(0, n, chunk), x.split(chunk)):
                with _bound(cond, start, part.shape[0], 1):
                    lp = flow.log_prob(
                        part,
                        divergence=divergence,
                        probes=probes,
                        probe_kind=probe_kind,
                        generator=generator,
                        solver=spec,
                        autocast=autocast,
                    )
                vals.append(lp.double())
                done += part.shape[0]
                if progress is not None:
                    progress(done, n)
        else:
            check_positive(probes, "probes", integer=True)
            size = max(1, chunk // probes)
            for start, part in zip(range(0, n, size), x.split(size)):
                b = part.shape[0]
                with _bound(cond, start, b, probes):
                    lp = flow.log_prob(
                        _repeat(part, probes),
                        divergence="hutchinson",
                        probes=1,
                        probe_kind=probe_kind,
                        generator=generator,
                        solver=spec,
                        autocast=autocast,
                    )
                vals.append(lp.double().reshape(probes, b))
                done += b
                if progress is not None:
                    progress(done, n)
    if not vals:
        empty = torch.zeros((probes, 0) if split else (0,), dtype=torch.float64, device=x.device)
        return empty, c.nfe
    return torch.cat(vals, dim=-1), c.nfe


def score_rows(
    flow: Flow,
    x: Tensor | np.ndarray,
    *,
    divergence: str = "auto",
    probes: int = 16,
    probe_kind: str = "rademacher",
    bits_per_dim: bool = False,
    chunk: int = 4096,
    solver: str | SolverSpec = "dopri5",
    steps: int = 16,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    error_norm: str = "rows",
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    compile: bool = False,
    autocast: str = "none",
) -> ScoreResult:
    r"""One log-density per row of ``x`` (an anomaly score: low = atypical).

    .. math::
        \log p(x) = \log N(z; 0, I) + \sum_n \int_0^1 \operatorname{div} v_n\,ds - \sum\log\sigma,
        \qquad \text{bits/dim} = -\log p(x) / (d \ln 2).

    Every row is checked before anything is integrated (finite values, the flow's width); the
    error names the bad rows. With Hutchinson's estimator each row gets ``K = probes``
    independent estimates (``K`` probes held fixed along each path, as in FFJORD); the value is
    their mean, unbiased for ``log p``, and ``stderr`` their standard deviation over ``sqrt(K)``.

    Arguments:
        flow: a trained flow (data units).
        x: ``(n, *event_shape)`` rows, or flattened ``(n, d)`` (a tensor or a NumPy array); moved
            to the flow's device and dtype.
        divergence: ``"exact"`` (autograd trace; no stderr), ``"hutchinson"`` or ``"auto"`` (exact
            up to 16 dimensions, see :func:`iterflow.core.integrand.resolve_divergence`).
        probes: ``K >= 2`` probes per row (Hutchinson only); probe_kind: ``"rademacher"`` or
            ``"gaussian"``.
        bits_per_dim: report ``-log p / (d ln 2)`` instead of ``log p`` in nats.
        chunk: largest batch handed to the solver (rows; rows times probes with Hutchinson).
        solver, steps, atol, rtol: integration of the likelihood ODE.
        error_norm: an adaptive solver's error control (:class:`~iterflow.core.ode.SolverSpec`).
            ``rows`` (default for scores): a step is accepted only when every row of the chunk
            meets the tolerance, so each score is as accurate as asked whatever rows share its
            chunk; ``batch``: torchdiffeq's RMS over the chunk (the mean NLL of ``iterflow eval``),
            cheaper, but one hard row among thousands can be off by far more than the tolerance.
            Measured by ``benchmarks/bench_speed.py`` (results/speed_likelihood_t2.md, 2-64-D
            at 1e-5): 23-73 % more NFE, the largest per-row error 6-18 times smaller. Ignored
            when ``solver`` is a :class:`~iterflow.core.ode.SolverSpec`.
        generator: randomness of the probes (default: a generator seeded with 0 on the flow's
            device, so results are reproducible).
        progress: called with ``(rows_done, n)`` after each chunk (a progress bar).
        compile: integrate through :meth:`Flow.compiled` (``torch.compile``; seconds of
            compilation per chunk shape, then faster evaluations of MLP flows' exact trace:
            ``benchmarks/bench_speed.py``, section ``likelihood``, the ``compiled`` rows).
        autocast: ``"bf16"``: the velocities under bfloat16 autocast, for loose tolerances
            (``atol, rtol >= 1e-4``) where its rounding stays below the solver's error
            (:meth:`Flow.log_prob`; with ``compile`` the fastest exact trace of an MLP flow on
            hardware with fast bf16 products).

    Returns:
        :class:`ScoreResult` (values and stderr as float64 on the CPU).

    Raises:
        InputError: naming ``x`` (with the row), ``divergence``, ``probes``, ``chunk``, ``solver``...
    """
    spec = (
        solver
        if isinstance(solver, SolverSpec)
        else SolverSpec(solver, steps, atol, rtol, error_norm=error_norm)
    )
    kind = resolve_divergence(divergence, flow.dim)
    check_choice(probe_kind, PROBE_KINDS, "probe_kind")
    check_positive(chunk, "chunk", integer=True)
    if kind == "hutchinson":
        check_positive(probes, "probes", integer=True)
        if probes < 2:
            fail("probes", "must be at least 2 (the standard error needs two probes)", probes)
    for name, flag in (("bits_per_dim", bits_per_dim), ("compile", compile)):
        if not isinstance(flag, bool):
            fail(name, "must be True or False", flag)
    likelihood_autocast(autocast, spec, flow.shift)  # checked before any row is integrated
    rows = check_rows(x, flow.event_shape, "x")
    like = flow.shift
    rows = rows.to(device=like.device, dtype=like.dtype)
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    lp, nfe = log_density_rows(
        flow.compiled() if compile else flow,
        rows,
        spec=spec,
        divergence=kind,
        probes=probes,
        probe_kind=probe_kind,
        generator=generator,
        chunk=chunk,
        per_probe=True,
        progress=progress,
        autocast=autocast,
    )
    lp = lp.cpu()
    stderr: Tensor | None
    if kind == "hutchinson":  # (K, n)
        values, stderr = lp.mean(0), lp.std(0) / math.sqrt(probes)
    else:
        values, stderr = lp, None
    units = "nats"
    if bits_per_dim:
        per = flow.dim * math.log(2.0)
        values, units = -values / per, "bits/dim"
        stderr = None if stderr is None else stderr / per
    return ScoreResult(
        values=values,
        stderr=stderr,
        units=units,
        divergence=kind,
        probes=probes if kind == "hutchinson" else None,
        nfe=nfe,
    )
