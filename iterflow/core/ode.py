"""ODE integration and divergence estimators.

Fixed-step explicit Runge-Kutta solvers are a few lines of *data* (Butcher tableaus) driven by one
loop; adaptive solvers (``dopri5``, ``bosh3``, ``dopri8``, ``adaptive_heun``) come from torchdiffeq.
States are a tensor or a tuple of tensors (the likelihood integrates ``(x, accumulated divergence)``).

Convention: ``f(t, y)`` returns dy/dt; ``t`` is a 0-dim tensor with the state's dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.errors import Registry, check_positive, fail

State = Tensor | tuple[Tensor, ...]
VectorField = Callable[[Tensor, State], State]


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
    """

    name: str = "dopri5"
    steps: int = 16
    atol: float = 1e-5
    rtol: float = 1e-5

    def __post_init__(self) -> None:
        if self.name not in solver_names():
            fail("solver", f"must be one of {solver_names()}", self.name)
        check_positive(self.steps, "steps", integer=True)
        check_positive(self.atol, "atol")
        check_positive(self.rtol, "rtol")

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE_SOLVERS


def _axpy(y: State, h: Tensor | float, ks: list[State], coeffs: tuple[float, ...]) -> State:
    """y + h * sum_i coeffs[i] * ks[i], for a tensor or a tuple of tensors."""
    if isinstance(y, Tensor):
        out = y
        for c, k in zip(coeffs, ks):
            if c != 0.0:
                out = out + (h * c) * k
        return out
    return tuple(_axpy(yi, h, [k[i] for k in ks], coeffs) for i, yi in enumerate(y))  # type: ignore[index]


def _time_grid(t0: float, t1: float, steps: int, like: Tensor) -> Tensor:
    return torch.linspace(t0, t1, steps + 1, dtype=like.dtype, device=like.device)


def _first(y: State) -> Tensor:
    return y if isinstance(y, Tensor) else y[0]


def rk_step(f: VectorField, t: Tensor, y: State, h: Tensor, tab: Tableau) -> State:
    """One explicit Runge-Kutta step of size ``h`` from ``(t, y)``."""
    ks: list[State] = []
    for c, a in zip(tab.c, tab.a):
        yi = _axpy(y, h, ks, a) if a else y
        ks.append(f(t + c * h, yi))
    return _axpy(y, h, ks, tab.b)


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
        out = torchdiffeq.odeint(f, y0, ts, method=spec.name, atol=spec.atol, rtol=spec.rtol)
        if isinstance(out, Tensor):
            states: list[State] = list(out.unbind(0))
        else:
            states = [tuple(o[i] for o in out) for i in range(len(ts))]
        return states if save_every_step else states[-1]
    tab = FIXED_SOLVERS.get(spec.name, "solver")
    h = grid[1] - grid[0]
    y = y0
    states = [y0]
    for i in range(spec.steps):
        y = rk_step(f, grid[i], y, h, tab)
        if save_every_step:
            states.append(y)
    return states if save_every_step else y


# ----------------------------------------------------------------------------------------------
# Divergence estimators. ``v`` must have been computed from ``x`` with autograd recording.
# ----------------------------------------------------------------------------------------------


def divergence_exact(v: Tensor, x: Tensor, *, create_graph: bool) -> Tensor:
    """Exact trace of dv/dx.

    All ``d`` vector-Jacobian products with the basis vectors run as one batched backward pass
    (``is_grads_batched``, i.e. vmap over the backward graph); where an operation of the network does not
    support that, it falls back to ``d`` ordinary backward passes.

    Arguments:
        v: velocity, shape ``(B, *E)``, computed from ``x`` (same shape) with grad enabled.
        x: input that requires grad.
        create_graph: keep the graph (for training through the divergence).

    Returns:
        ``(B,)`` divergence.
    """
    b = v.shape[0]
    d = v[0].numel()
    eye = (
        torch.eye(d, dtype=v.dtype, device=v.device).reshape(d, 1, *v.shape[1:]).expand(d, *v.shape)
    )
    try:
        g = torch.autograd.grad(
            v, x, eye, create_graph=create_graph, retain_graph=True, is_grads_batched=True
        )[0]
        return torch.diagonal(g.reshape(d, b, d), dim1=0, dim2=2).sum(-1)  # (B,)
    except RuntimeError:  # an op without a batching rule: one backward pass per dimension
        return _divergence_loop(v, x, create_graph=create_graph)


def _divergence_loop(v: Tensor, x: Tensor, *, create_graph: bool) -> Tensor:
    vf = v.reshape(v.shape[0], -1)
    div = torch.zeros(vf.shape[0], dtype=v.dtype, device=v.device)
    for i in range(vf.shape[1]):
        g = torch.autograd.grad(vf[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
        div = div + g.reshape(g.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(v: Tensor, x: Tensor, eps: Tensor, *, create_graph: bool) -> Tensor:
    """Hutchinson's estimator ``mean_k eps_k^T (dv/dx) eps_k`` (unbiased when E[eps eps^T] = I).

    The ``K`` probes run as one batched backward pass (falling back to a loop where an operation does
    not support batched gradients).

    Arguments:
        v: velocity ``(B, *E)`` computed from ``x``.
        x: input that requires grad.
        eps: probes ``(K, B, *E)``.
        create_graph: keep the graph.

    Returns:
        ``(B,)`` divergence estimate.
    """
    k = eps.shape[0]
    if k > 1:
        try:
            g = torch.autograd.grad(
                v, x, eps, create_graph=create_graph, retain_graph=True, is_grads_batched=True
            )[0]
            return (g * eps).reshape(k, v.shape[0], -1).sum(2).mean(0)
        except RuntimeError:
            pass
    total = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for j in range(k):
        g = torch.autograd.grad(v, x, eps[j], create_graph=create_graph, retain_graph=True)[0]
        total = total + (g * eps[j]).reshape(v.shape[0], -1).sum(1)
    return total / k


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
