"""ODE integration and the Jacobian terms of a velocity (divergence, Frobenius norm).

Fixed-step explicit Runge-Kutta solvers are a few lines of *data* (Butcher tableaus) driven by one
loop (float step weights, one fused ``add`` per stage term and tensor); adaptive solvers
(``dopri5``, ``bosh3``, ``dopri8``, ``adaptive_heun``) come from torchdiffeq. States are a tensor or
a tuple of tensors (the likelihood integrates ``(x, accumulated divergence)``).

Why torchdiffeq for the adaptive path, not a leaner loop of our own: its bookkeeping costs about
0.2-0.35 ms per function evaluation (measured: dopri5 on a tuple state with a trivial field, CPU,
one thread, batch 64-2,000), against about 25 ms for the velocity and exact divergence of the
3 x 256 MLP at 2,000 points in 2-D (1-2%; 15% at batch 64). Its step-size control on a tuple state
(the largest RMS over the tuple's tensors) is kept as is: it is the control of the plain evaluator
users write (benchmarks/bench_speed.py), and the alternatives measured on the demo's checkerboard
model at ``atol = rtol = 1e-5`` were worse: one RMS over the flattened ``(x, logp)`` state, 92 NFE
and a 3x larger largest per-point NLL error (98 NFE with the tuple); the error of ``x`` alone, 74
NFE and 12x; per-row step sizes, 109 NFE per row and 1.8x; ``dopri8``, 262 NFE. That control is an
RMS over the whole batch, so one hard row among thousands can miss the tolerance by far;
``SolverSpec(error_norm="rows")`` holds every row to it (the largest per-row RMS, shared steps).

Convention: ``f(t, y)`` returns dy/dt; ``t`` is a 0-dim tensor with the state's dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from iterflow.errors import Registry, check_choice, check_positive, fail

State = Tensor | tuple[Tensor, ...]
# f(t, y) -> dy/dt with y and dy/dt of one State form (a tensor, or a tuple of tensors).
VectorField = Callable[[Tensor, Any], Any]


@dataclass(frozen=True)
class Tableau:
    """Explicit Runge-Kutta tableau: stages ``c``, lower-triangular ``a``, weights ``b``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int


FIXED_SOLVERS: Registry[Tableau] = Registry("solver")
FIXED_SOLVERS.register("euler", Tableau((0.0,), ((),), (1.0,), 1))
FIXED_SOLVERS.register("midpoint", Tableau((0.0, 0.5), ((), (0.5,)), (0.0, 1.0), 2))
FIXED_SOLVERS.register("heun", Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5), 2))
FIXED_SOLVERS.register(
    "rk4",
    Tableau(
        (0.0, 0.5, 0.5, 1.0),
        ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
        (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        4,
    ),
)
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "dopri8", "adaptive_heun")
ERROR_NORMS = ("batch", "rows")


def solver_names() -> list[str]:
    """All solver names accepted by :func:`integrate`."""
    return sorted([*FIXED_SOLVERS.names(), *ADAPTIVE_SOLVERS])


@dataclass(frozen=True)
class SolverSpec:
    """How to integrate an ODE: a solver name plus its step count or tolerances.

    Arguments:
        name: ``euler``, ``midpoint``, ``heun``, ``rk4`` (fixed steps) or ``dopri5``, ``bosh3``,
            ``dopri8``, ``adaptive_heun`` (adaptive, via torchdiffeq).
        steps: number of fixed steps over the interval (ignored by adaptive solvers).
        atol, rtol: tolerances of adaptive solvers (ignored by fixed-step ones).
        error_norm: how an adaptive solver measures a step's error on a batch. ``batch``: the
            RMS over all the batch's entries (torchdiffeq's control: one hard row among ``B``
            weighs ``1 / sqrt(B)``, so its error can exceed the tolerance by orders of magnitude);
            ``rows``: the largest per-row RMS, so that every row meets the tolerance and a row's
            result does not depend on the rows it is batched with (:func:`row_rms_max`).
    """

    name: str = "dopri5"
    steps: int = 16
    atol: float = 1e-5
    rtol: float = 1e-5
    error_norm: str = "batch"

    def __post_init__(self) -> None:
        if self.name not in solver_names():
            fail("solver", f"must be one of {solver_names()}", self.name)
        check_positive(self.steps, "steps", integer=True)
        check_positive(self.atol, "atol")
        check_positive(self.rtol, "rtol")
        check_choice(self.error_norm, ERROR_NORMS, "error_norm")

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE_SOLVERS


def row_rms_max(y: State) -> Tensor:
    """The largest RMS of a state, taken row by row and tensor by tensor (rows: the leading
    dimension; each tensor of a tuple on its own, e.g. a row's ``x`` entries and, apart, its
    log-density): torchdiffeq's default mixed norm (the largest RMS over the tensors of a tuple)
    applied to every row instead of to the whole batch.

    As an adaptive solver's error norm (``SolverSpec(error_norm="rows")``, passed to torchdiffeq as
    ``options={"norm": ...}``) it accepts a step only when every row's scaled error is below one
    in every tensor, so a row's log-density is held to the tolerance on its own, not diluted by
    its ``d`` entries of ``x``. Tensors without a leading row dimension matching the first
    tensor's count as one row each.

    Example:
        >>> y = (torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([0.0, 6.0]))
        >>> float(row_rms_max(y))  # row 1's log-density; row 0's x: sqrt((9 + 16) / 2) = 3.54
        6.0
    """
    parts = y if isinstance(y, tuple) else (y,)
    rows = parts[0].shape[0] if parts[0].dim() > 0 else 1
    norms = []
    for p in parts:
        if p.dim() > 0 and p.shape[0] == rows:
            norms.append(p.reshape(rows, -1).pow(2).mean(1).sqrt().max())
        else:
            norms.append(p.pow(2).mean().sqrt())
    return torch.stack(norms).max() if len(norms) > 1 else norms[0]


def _axpy(y: State, terms: list[tuple[float, State]]) -> State:
    """``y + sum_i w_i * k_i`` for a tensor or a tuple of tensors (Python-float weights ``w_i``,
    zero ones skipped): one fused ``add`` per term and tensor."""
    if isinstance(y, Tensor):
        out = y
        for w, k in terms:
            if w != 0.0:
                out = torch.add(out, k, alpha=w)  # type: ignore[arg-type]
        return out
    return tuple(_axpy(yi, [(w, k[i]) for w, k in terms]) for i, yi in enumerate(y))  # type: ignore[index,misc]


def _time_grid(t0: float, t1: float, steps: int, like: Tensor) -> Tensor:
    return torch.linspace(t0, t1, steps + 1, dtype=like.dtype, device=like.device)


def _first(y: State) -> Tensor:
    return y if isinstance(y, Tensor) else y[0]


def rk_step(f: VectorField, t: Tensor, y: State, h: Tensor | float, tab: Tableau) -> State:
    """One explicit Runge-Kutta step of size ``h`` from ``(t, y)``."""
    hf = float(h)
    ks: list[State] = []
    for c, a in zip(tab.c, tab.a):
        yi = _axpy(y, [(hf * w, k) for w, k in zip(a, ks)]) if a else y
        ks.append(f(t + c * hf if c else t, yi))
    return _axpy(y, [(hf * w, k) for w, k in zip(tab.b, ks)])


def integrate(
    f: VectorField,
    y0: State,
    t0: float,
    t1: float,
    spec: SolverSpec,
    *,
    save_every_step: bool = False,
) -> State | list[State]:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` (``t1 < t0`` integrates backward).

    Arguments:
        f: vector field ``f(t, y)``.
        y0: initial state, a tensor or a tuple of tensors.
        t0, t1: start and end times.
        spec: solver and its steps / tolerances.
        save_every_step: return the list of states on the grid (``spec.steps + 1`` states, the
            same grid for adaptive solvers, which then step adaptively between grid points).

    Returns:
        The state at ``t1``, or the list of states on the time grid.
    """
    like = _first(y0)
    grid = _time_grid(t0, t1, spec.steps, like)
    if spec.adaptive:
        import torchdiffeq

        ts = grid if save_every_step else grid[[0, -1]]
        options = {"norm": row_rms_max} if spec.error_norm == "rows" else None
        out = torchdiffeq.odeint(
            f, y0, ts, method=spec.name, atol=spec.atol, rtol=spec.rtol, options=options
        )
        if isinstance(out, Tensor):
            states: list[State] = list(out.unbind(0))
        else:
            states = [tuple(o[i] for o in out) for i in range(len(ts))]
        return states if save_every_step else states[-1]
    tab = FIXED_SOLVERS.get(spec.name, "solver")
    h = (t1 - t0) / spec.steps
    y = y0
    states = [y0]
    for i in range(spec.steps):
        y = rk_step(f, grid[i], y, h, tab)
        if save_every_step:
            states.append(y)
    return states if save_every_step else y


# ----------------------------------------------------------------------------------------------
# Jacobian terms: divergence and squared Frobenius norm of dv/dx from vector-Jacobian products.
# ``v`` must have been computed from ``x`` with autograd recording.
# ----------------------------------------------------------------------------------------------

#: The ``m`` vector-Jacobian products of :func:`jacobian_terms` (``m = d`` basis vectors for the exact
#: terms, ``m = K`` probes for Hutchinson's) run as ONE batched backward pass (``is_grads_batched``, a
#: vmap over the backward graph) from this many on, and as ``m`` ordinary backward passes below it,
#: for training (``create_graph=True``) and evaluation alike. Measured in this change: CPU,
#: 1 thread, float32, MLP velocity 3 x 64 GELU, RK4 over 8 steps integrating the divergence and the
#: Jacobian norm (exact trace), training including the backward pass of the loss; time of the per-row
#: loop / time of the batched pass, the range over 3-6 runs on a shared 2-core machine (the integrand
#: :func:`iterflow.core.integrand.integrate_path` at batch 256 and an equivalent standalone script at
#: batch 128-512; medians or minima of 5-11 interleaved repetitions each):
#:
#: ====  =========================  ===========
#: d     training                   evaluation
#: ====  =========================  ===========
#: 2     0.87 - 1.01                0.83 - 1.01
#: 3     0.95 - 1.03                0.90 - 1.04
#: 4     0.89 - 1.19 (2 of 3 > 1)   1.16 - 1.17
#: 5     0.95 - 1.13 (2 of 3 > 1)   1.10 - 1.24
#: 6     1.08 - 1.14                1.23 - 1.28
#: 8     1.20 - 1.43                1.36 - 1.42
#: 16    1.02 - 1.08                1.42 - 1.45
#: ====  =========================  ===========
#:
#: (e.g. d = 16, evaluation: 607 ms / 424 ms per integration of 256 points). Up to 3 products the
#: loop is as fast or faster (the batched pass pays for vmap); from 4 on the batched pass wins in
#: both modes. Off the CPU the batched pass is always used (one backward launch instead of ``m``;
#: not measured in this change).
#:
#: Images are the exception on the CPU: for the U-Net (:class:`~iterflow.core.nn.UNet`, channels 32,
#: mults 1-2-2, 32 images of 1 x 28 x 28; evaluation, K Hutchinson probes) the batched pass is
#: slower, loop / batched = 0.93 at K = 2 and 0.73 at K = 4 (0.81 at K = 4 on 8 x 8 images; the
#: batching rules of the convolutions' backward copy), and forward-mode products (``torch.func``
#: ``vmap(jvp)``) take twice the loop's time. So on the CPU samples with more than one axis take
#: the loop. (The package's MLP gets its products in one forward pass instead:
#: :mod:`iterflow.core.nn.mlp_jacobian`.)
BATCHED_MIN_PRODUCTS = 4


def use_batched_backward(products: int, device: torch.device, *, event_dims: int = 1) -> bool:
    """Whether ``products`` vector-Jacobian products of a velocity whose samples have
    ``event_dims`` axes run as one batched backward pass (the rule and its measurement:
    :data:`BATCHED_MIN_PRODUCTS`)."""
    if products < 2:
        return False
    if device.type != "cpu":
        return True
    return products >= BATCHED_MIN_PRODUCTS and event_dims == 1


def jacobian_terms(
    v: Tensor,
    x: Tensor,
    probes: Tensor | None = None,
    *,
    create_graph: bool,
    batched: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Divergence and squared Frobenius norm of ``J = dv/dx`` per sample, from one set of products.

    Exact (``probes is None``): the ``d`` products ``e_i^T J`` are the rows of ``J``, so
    ``tr J = sum_i (e_i^T J)_i`` and ``||J||_F^2 = sum_i |e_i^T J|^2``. Hutchinson (probes
    ``eps_k`` with ``E[eps eps^T] = I``): ``mean_k eps_k^T J eps_k`` and ``mean_k |eps_k^T J|^2``,
    unbiased estimates of both.

    Arguments:
        v: velocity ``(B, *E)`` computed from ``x`` (same shape) with grad enabled.
        x: input that requires grad.
        probes: ``(K, B, *E)`` Hutchinson probes, or ``None`` for the exact terms.
        create_graph: keep the graph (training through the terms).
        batched: one batched backward pass (``True``), one pass per product (``False``) or the
            measured rule :func:`use_batched_backward` (``None``). Where an operation of the network
            has no batching rule, the batched pass falls back to the loop.

    Returns:
        ``(div, frob)``, each ``(B,)``.
    """
    products = v[0].numel() if probes is None else probes.shape[0]
    if batched is None:
        batched = use_batched_backward(products, v.device, event_dims=v.ndim - 1)
    if batched and products > 1:
        try:
            return _terms_batched(v, x, probes, create_graph)
        except RuntimeError:  # an op without a batching rule: one backward pass per product
            pass
    return _terms_loop(v, x, probes, create_graph)


def _terms_batched(
    v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    b, d = v.shape[0], v[0].numel()
    if probes is None:
        vecs = torch.eye(d, dtype=v.dtype, device=v.device).reshape(d, 1, *v.shape[1:])
        vecs = vecs.expand(d, *v.shape)
    else:
        vecs = probes
    g = torch.autograd.grad(
        v, x, vecs, create_graph=create_graph, retain_graph=True, is_grads_batched=True
    )[0].reshape(vecs.shape[0], b, d)  # (m, B, d): row m is vecs[m]^T J
    frob = g.pow(2).sum((0, 2))
    if probes is None:
        return torch.diagonal(g, dim1=0, dim2=2).sum(-1), frob
    k = probes.shape[0]
    return (g * probes.reshape(k, b, d)).sum((0, 2)) / k, frob / k


def _terms_loop(
    v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    b = v.shape[0]
    div, frob = v.new_zeros(b), v.new_zeros(b)
    if probes is None:
        vf = v.reshape(b, -1)
        for i in range(vf.shape[1]):
            row = torch.autograd.grad(
                vf[:, i].sum(), x, create_graph=create_graph, retain_graph=True
            )[0].reshape(b, -1)  # (B, d): e_i^T J
            div, frob = div + row[:, i], frob + row.pow(2).sum(1)
        return div, frob
    for eps in probes:
        g = torch.autograd.grad(v, x, eps, create_graph=create_graph, retain_graph=True)[0]
        div = div + (g * eps).reshape(b, -1).sum(1)
        frob = frob + g.pow(2).reshape(b, -1).sum(1)
    return div / probes.shape[0], frob / probes.shape[0]


def divergence_exact(
    v: Tensor, x: Tensor, *, create_graph: bool, batched: bool | None = None
) -> Tensor:
    """Exact trace of dv/dx, ``(B,)``: the divergence of :func:`jacobian_terms` without probes.

    Arguments:
        v: velocity, shape ``(B, *E)``, computed from ``x`` (same shape) with grad enabled.
        x: input that requires grad.
        create_graph: keep the graph (for training through the divergence).
        batched: see :func:`jacobian_terms` (``None``: the measured rule).
    """
    return jacobian_terms(v, x, None, create_graph=create_graph, batched=batched)[0]


def divergence_hutchinson(
    v: Tensor, x: Tensor, eps: Tensor, *, create_graph: bool, batched: bool | None = None
) -> Tensor:
    """Hutchinson's estimator ``mean_k eps_k^T (dv/dx) eps_k`` (unbiased when E[eps eps^T] = I).

    Arguments:
        v: velocity ``(B, *E)`` computed from ``x``.
        x: input that requires grad.
        eps: probes ``(K, B, *E)``.
        create_graph: keep the graph.
        batched: see :func:`jacobian_terms` (``None``: the measured rule).

    Returns:
        ``(B,)`` divergence estimate.
    """
    return jacobian_terms(v, x, eps, create_graph=create_graph, batched=batched)[0]


def make_probes(
    shape: tuple[int, ...],
    probes: int,
    *,
    kind: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw ``probes`` Hutchinson probe vectors of ``shape`` (Rademacher or Gaussian)."""
    check_positive(probes, "probes", integer=True)
    gen_device = generator.device if generator is not None else torch.device(device)
    if kind == "rademacher":
        e = torch.randint(0, 2, (probes, *shape), generator=generator, device=gen_device)
        e = e.to(dtype) * 2 - 1
    elif kind == "gaussian":
        e = torch.randn((probes, *shape), generator=generator, device=gen_device, dtype=dtype)
    else:
        fail("probe_kind", "must be 'rademacher' or 'gaussian'", kind)
    return e.to(device=device, dtype=dtype)
