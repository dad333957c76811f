"""Rectified-flow toolkit: closed-form velocity of a finite data set, straightness, transport cost,
sample quality against NFE, memorisation, and simulated (noise, data) pairs for reflow/distillation.

References:
    Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
    Flow", arXiv:2209.03003 (reflow, straightness, distillation).
    Lipman et al., "Flow Matching for Generative Modeling", arXiv:2210.02747.
    Bertrand, Gagneux, Massias & Emonet, "On the Closed-Form of Flow Matching: Generalization Does
    Not Arise from Target Stochasticity", arXiv:2506.03719 (closed-form velocity, memorisation).

Time convention. The papers put noise at ``t = 0`` and data at ``t = 1`` with the straight
interpolant ``X_t = t X_1 + (1 - t) X_0``. iterflow keeps data at ``s = 0`` and noise at ``s = 1``
(:mod:`iterflow.flow`), so ``t = 1 - s`` and every velocity changes sign: ``dx/ds = -dx/dt``. All
quantities here are computed in the flow's *model units* (after its normalisation), where the noise
is ``N(0, I)``; sample-quality and memorisation figures are in data units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Block, Flow
from iterflow.core.guidance import LABEL_KEY, guidance
from iterflow.core.ode import SolverSpec
from iterflow.errors import check_positive, fail

# Figures ``iterflow eval`` adds for every run (kept cheap: they run on every evaluation):
# 256 noise draws and RK4 with 32 steps for vectors up to 256 entries, 32 draws and Euler with 32
# steps for larger events (images), where each velocity evaluation costs far more.
EVAL_POINTS = 256
EVAL_SPEC = SolverSpec("rk4", 32)
EVAL_LARGE_DIM = 256
EVAL_LARGE = (32, SolverSpec("euler", 32))

# Largest number of (query, data point) pairs held at once by the closed-form velocity.
_BLOCK_ENTRIES = 2**21


# ----------------------------------------------------------------------------------------------
# Closed-form velocity of a finite data set
# ----------------------------------------------------------------------------------------------


def _time_column(s: Tensor | float, x: Tensor) -> Tensor:
    """``s`` as a ``(B, 1)`` or ``(1, 1)`` tensor in ``x``'s device/dtype."""
    return torch.as_tensor(s, dtype=x.dtype, device=x.device).reshape(-1, 1)


class ClosedFormVelocity(nn.Module):
    r"""Exact flow-matching velocity of the straight interpolant for a finite data set.

    For data points ``x_1..x_N`` (model units) with ``X_s = (1 - s) x_I + s Z``, ``I`` uniform and
    ``Z ~ N(0, I)``, the minimiser of the flow-matching loss is the posterior mean of ``dX_s/ds``:

    .. math::
        v^*(x, s) = \sum_i w_i(x, s) \frac{x - x_i}{s} = \frac{x - m(x, s)}{s}, \qquad
        w_i \propto \exp\Big(-\frac{|x - (1 - s) x_i|^2}{2 s^2}\Big),

    with ``m = sum_i w_i x_i`` the posterior mean of the data point (:meth:`exact`). In the
    papers' convention (noise at ``t = 0``, ``t = 1 - s``) this is
    ``v*(x, t) = sum_i w_i (x_i - x) / (1 - t)`` with ``w_i ∝ N((x - t x_i) / (1 - t); 0, I)``.
    The weights are a softmax computed by a streaming log-sum-exp over chunks of the data (in
    ``compute_dtype``), so neither underflow at small ``s`` nor an ``(B, N)`` matrix for large
    ``N`` is a problem.

    ``v*`` is singular at the data end: at ``s = 0`` it is ``0 / 0`` (its limit along a path depends
    on the path), and solvers that evaluate there (RK4's last stage, dopri5) would go wrong. The
    module's :meth:`forward` therefore runs the exact flow on ``[s_min, 1]`` reparametrised to the
    block's ``[0, 1]``:

    .. math::
        v(x, s) = (1 - s_{min})\, v^*(x, \sigma(s)), \qquad \sigma(s) = s_{min} + (1 - s_{min}) s,

    whose trajectories are those of ``v*`` stopped at ``sigma = s_min``, i.e. within
    ``s_min |Z - x_i|`` of a training point (memorisation). A one-point data set gives straight
    paths traversed at constant speed, so one Euler step is exact for every ``s_min``. Integrate it
    with fixed-step solvers (Euler, RK4): adaptive ones (dopri5) step past ``s = 0`` and interpolate
    back, and past the end the field is only clamped, so their end points are approximate.

    Arguments:
        points: ``(N, *E)`` data points in model units (stored as a buffer).
        s_min: where the reparametrised flow stops (0: the exact ``v*`` on ``(0, 1]``; then decode
            with Euler, which never evaluates ``s = 0``).
        compute_dtype: dtype of the internal arithmetic (``float64`` keeps the distances exact
            enough at small ``s``).

    Example:
        >>> v = ClosedFormVelocity(torch.tensor([[1.0, 2.0]]), s_min=0.0)
        >>> v(torch.zeros(3, 2), torch.tensor(1.0))  # one point: (x - x_1) / s
        tensor([[-1., -2.],
                [-1., -2.],
                [-1., -2.]])
    """

    points: Tensor  # buffer

    def __init__(
        self, points: Tensor, *, s_min: float = 1e-3, compute_dtype: torch.dtype = torch.float64
    ) -> None:
        super().__init__()
        if not isinstance(points, Tensor) or points.ndim < 2 or points.shape[0] < 1:
            fail(
                "points",
                "must be a tensor of shape (N, *event_shape) with N >= 1",
                getattr(points, "shape", type(points).__name__),
            )
        if isinstance(s_min, bool) or not isinstance(s_min, (int, float)) or not 0.0 <= s_min < 1.0:
            fail("s_min", "must be a number in [0, 1)", s_min)
        self.s_min = float(s_min)
        self.compute_dtype = compute_dtype
        self.register_buffer("points", points.detach().clone())

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        st = torch.as_tensor(s, dtype=x.dtype, device=x.device)
        # adaptive solvers may probe slightly outside [0, 1]; rounding may pass 1
        sigma = (self.s_min + (1.0 - self.s_min) * st).clamp(min=self.s_min, max=1.0)
        return (1.0 - self.s_min) * self.exact(x, sigma)

    def exact(self, x: Tensor, s: Tensor | float) -> Tensor:
        """``v*(x, s) = (x - m(x, s)) / s`` at times ``s`` in ``(0, 1]`` (0-dim or ``(B,)``)."""
        st = self._times(s, x).reshape((-1,) + (1,) * (x.ndim - 1))
        return (x - self.posterior_mean(x, s)) / st

    def log_weights(self, x: Tensor, s: Tensor | float) -> Tensor:
        """Normalised log posterior weights ``log w_i(x, s)``, shape ``(B, N)``."""
        xf, pf = self._flat(x)
        logits = self._logits(xf, pf, (pf * pf).sum(1), self._times(s, xf))
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)

    def posterior_mean(self, x: Tensor, s: Tensor | float) -> Tensor:
        """``m(x, s) = sum_i w_i(x, s) x_i``, shape ``(B, *E)``, in ``x``'s dtype."""
        xf, pf = self._flat(x)
        st = self._times(s, xf)
        p2 = (pf * pf).sum(1)
        chunk = max(1, _BLOCK_ENTRIES // max(1, xf.shape[0]))
        run_max = torch.full((xf.shape[0], 1), -math.inf, dtype=xf.dtype, device=xf.device)
        total = torch.zeros_like(run_max)
        acc = torch.zeros_like(xf)
        for start in range(0, pf.shape[0], chunk):
            p, q = pf[start : start + chunk], p2[start : start + chunk]
            logits = self._logits(xf, p, q, st)  # (B, C)
            new_max = torch.maximum(run_max, logits.max(1, keepdim=True).values)
            rescale = torch.exp(run_max - new_max)
            w = torch.exp(logits - new_max)  # (B, C), each row's largest entry is <= 1
            total = total * rescale + w.sum(1, keepdim=True)
            acc = acc * rescale + w @ p
            run_max = new_max
        return (acc / total).to(x.dtype).reshape(x.shape)

    @staticmethod
    def _times(s: Tensor | float, x: Tensor) -> Tensor:
        st = _time_column(s, x)
        if not bool(((st > 0) & (st <= 1)).all()):
            fail(
                "s",
                "must lie in (0, 1] (v* is singular at the data end s = 0)",
                st.flatten()[:4].tolist(),
            )
        return st

    def _flat(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != tuple(self.points.shape[1:]):
            fail("x", f"must have shape (batch, {tuple(self.points.shape[1:])})", tuple(x.shape))
        xf = x.reshape(x.shape[0], -1).to(self.compute_dtype)
        pf = self.points.reshape(self.points.shape[0], -1).to(
            device=x.device, dtype=self.compute_dtype
        )
        return xf, pf

    @staticmethod
    def _logits(xf: Tensor, p: Tensor, p2: Tensor, st: Tensor) -> Tensor:
        """``-|x - (1 - s) p_j|^2 / (2 s^2)`` for ``xf (B, D)``, ``p (C, D)``, ``st (B|1, 1)``."""
        st = st.to(xf.dtype)
        a = 1.0 - st
        sq = (xf * xf).sum(1, keepdim=True) - 2.0 * a * (xf @ p.T) + (a * a) * p2[None, :]
        return -sq.clamp_min(0.0) / (2.0 * st * st)


def closed_form_flow(
    points: Tensor,
    *,
    shift: Tensor | None = None,
    scale: Tensor | None = None,
    s_min: float = 1e-3,
) -> Flow:
    """A one-block :class:`~iterflow.flow.Flow` driven by the exact velocity of ``points``.

    Arguments:
        points: ``(N, *E)`` training points in data units.
        shift, scale: the flow's normalisation (e.g. a trained run's, to compare with it); default
            identity.
        s_min: see :class:`ClosedFormVelocity`.

    Returns:
        A flow whose samples land within ``s_min |z - x_i|`` (model units) of a training point when
        the decoding is accurate: the field is stiff near the data end, so use many fixed steps
        (about 100 Euler steps for a thousand 2-D points; fewer leave samples between points).
    """
    probe = Flow([], tuple(points.shape[1:]), shift=shift, scale=scale).to(points.dtype)
    velocity = ClosedFormVelocity(probe.normalize(points), s_min=s_min)
    flow = Flow([Block(velocity)], tuple(points.shape[1:]), shift=probe.shift, scale=probe.scale)
    return flow.to(points.dtype)


# ----------------------------------------------------------------------------------------------
# Straightness and transport cost
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Straightness:
    r"""Path measures of a flow along its own decoding trajectories (model units).

    Attributes:
        straightness: ``S = sum_blocks int_0^1 E|(x(1) - x(0)) - v(x(s), s)|^2 ds``; zero iff every
            path is a straight line traversed at constant speed (then one Euler step is exact).
        transport_cost: ``E|Z - X|^2`` between the noise ``Z`` and the point it is decoded to.
        per_block: ``S`` of each block, in encoding order.
        nfe: velocity evaluations used.
    """

    straightness: float
    transport_cost: float
    per_block: tuple[float, ...]
    nfe: int


def _trapezoid(values: Tensor) -> Tensor:
    """Trapezoid rule on a uniform grid of ``[0, 1]``: ``values`` ``(K + 1, B)`` -> ``(B,)``."""
    k = values.shape[0] - 1
    return (values[1:] + values[:-1]).sum(0) / (2 * k)


@torch.no_grad()
def _block_straightness(block: Block, z: Tensor, spec: SolverSpec) -> tuple[Tensor, Tensor]:
    """Decode ``z`` through one block; return its end points and per-sample ``S`` ``(B,)``."""
    states = block.path(z, spec, reverse=True)  # s = 1 -> 0 on a uniform grid
    chord = (states[0] - states[-1]).flatten(1)  # x(1) - x(0), (B, D)
    grid = torch.linspace(1.0, 0.0, len(states), dtype=z.dtype, device=z.device)
    dev = torch.stack(
        [(chord - block(x, s).flatten(1)).pow(2).sum(1) for x, s in zip(states, grid, strict=True)]
    )
    return states[-1], _trapezoid(dev)


@torch.no_grad()
def straightness(
    flow: Flow,
    n: int = EVAL_POINTS,
    *,
    z: Tensor | None = None,
    generator: torch.Generator | None = None,
    solver: str | SolverSpec = EVAL_SPEC,
    steps: int = 32,
) -> Straightness:
    r"""Straightness and transport cost of ``flow`` (Liu et al. arXiv:2209.03003).

    .. math::
        S(v) = \int_0^1 E\,|(X_1 - X_0) - v(X_s, s)|^2\, ds, \qquad C = E\,|X_1 - X_0|^2,

    along the flow's trajectories ``X_s`` from noise ``X_1 = Z ~ N(0, I)`` to ``X_0`` (model units),
    integrated by ``solver``; the ``ds`` integral is the trapezoid rule on the solver's grid (its
    ``steps + 1`` states, where ``v`` is evaluated once more). For chains, ``S`` sums the blocks.

    Arguments:
        flow: any flow.
        n: number of noise draws (ignored when ``z`` is given).
        z: ``(B, *E)`` noise to start from (model units).
        generator: randomness of the noise.
        solver, steps: a :class:`~iterflow.ode.SolverSpec` or a fixed-step solver name and steps.

    Returns:
        :class:`Straightness`.
    """
    spec = solver if isinstance(solver, SolverSpec) else SolverSpec(solver, steps)
    if spec.adaptive:
        fail("solver", "must be a fixed-step solver (euler, midpoint, heun, rk4)", spec.name)
    if z is None:
        check_positive(n, "n", integer=True)
        like = flow.shift
        gdev = generator.device if generator is not None else like.device
        z = torch.randn((n, *flow.event_shape), generator=generator, device=gdev, dtype=like.dtype)
        z = z.to(like.device)
    elif tuple(z.shape[1:]) != flow.event_shape or z.ndim != len(flow.event_shape) + 1:
        fail("z", f"must have shape (batch, *{flow.event_shape})", tuple(z.shape))
    with flow.count_nfe() as c:
        x, per_block = z, []
        for b in reversed(flow.chain):
            x, s_b = _block_straightness(b, x, spec)
            per_block.append(float(s_b.double().mean()))
    cost = float((z - x).flatten(1).double().pow(2).sum(1).mean())
    return Straightness(float(sum(per_block)), cost, tuple(reversed(per_block)), c.nfe)


def quick_straightness(flow: Flow, seed: int) -> Straightness:
    """:func:`straightness` at the cheap budget of ``iterflow eval`` (see ``EVAL_POINTS``)."""
    n, spec = (EVAL_POINTS, EVAL_SPEC) if flow.dim <= EVAL_LARGE_DIM else EVAL_LARGE
    gen = torch.Generator(device=flow.shift.device).manual_seed(seed)
    return straightness(flow, n, generator=gen, solver=spec)


# ----------------------------------------------------------------------------------------------
# (noise, data) pairs of a flow: the coupling that reflow and distillation train on
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pairs:
    """A deterministic coupling simulated from a flow, in the flow's model units.

    Attributes:
        data: ``(n, *E)`` decoded end points (the ``s = 0`` side).
        noise: ``(n, *E)`` the noise they were decoded from (the ``s = 1`` side).
        labels: ``(n,)`` the class label each pair was decoded under (a label-conditional
            source), or ``None``.
    """

    data: Tensor
    noise: Tensor
    labels: Tensor | None = None


def decode_model_units(flow: Flow, z: Tensor, spec: SolverSpec) -> Tensor:
    """Integrate every block of ``flow`` backward from ``z`` and stay in model units."""
    for b in reversed(flow.chain):
        z = b.decode(z, spec)
    return z


@torch.no_grad()
def simulate_pairs(
    flow: Flow,
    n: int,
    *,
    spec: SolverSpec,
    generator: torch.Generator | None = None,
    chunk: int = 8192,
    labels: Tensor | None = None,
    guidance_weight: float = 1.0,
) -> Pairs:
    """Draw ``Z ~ N(0, I)`` and decode it: the pairs ``(X_0 = flow^{-1}(Z), Z)`` of reflow.

    Arguments:
        flow: the source flow.
        n: number of pairs.
        spec: solver that simulates the flow.
        generator: randomness of the noise (on any device; the noise is moved to the flow's).
        chunk: pairs decoded at a time.
        labels: ``(n,)`` class labels of a label-conditional source: pair ``i`` is decoded under
            label ``labels[i]`` (kept with the pairs).
        guidance_weight: classifier-free guidance weight of the decoding
            (:mod:`iterflow.core.guidance`; 1: the conditional field).
    """
    check_positive(n, "n_pairs", integer=True)
    like = flow.shift
    gdev = generator.device if generator is not None else like.device
    z = torch.randn((n, *flow.event_shape), generator=generator, device=gdev, dtype=like.dtype)
    z = z.to(like.device)
    if labels is None:
        data = torch.cat([decode_model_units(flow, c, spec) for c in z.split(chunk)])
        return Pairs(data=data, noise=z)
    if labels.shape != (n,):
        fail("labels", f"must hold one label per pair, shape ({n},)", tuple(labels.shape))
    labels = labels.to(like.device)
    parts = []
    with guidance(guidance_weight):
        for c, y in zip(z.split(chunk), labels.split(chunk), strict=True):
            with conditioning(**{LABEL_KEY: y}):
                parts.append(decode_model_units(flow, c, spec))
    return Pairs(data=torch.cat(parts), noise=z, labels=labels)


def save_pairs(path: str | Path, pairs: Pairs, info: dict[str, str]) -> None:
    """Write pairs as safetensors (keys ``data``, ``noise`` and, when labelled, ``labels``) with
    string metadata ``info``."""
    from iterflow.io import save_tensors

    tensors = {"data": pairs.data, "noise": pairs.noise}
    if pairs.labels is not None:
        tensors["labels"] = pairs.labels
    save_tensors(path, tensors, metadata=info)


def load_pairs(path: str | Path, argument: str = "pairs") -> tuple[Pairs, dict[str, str]]:
    """Read pairs written by :func:`save_pairs`; returns them (on CPU) and their metadata."""
    from safetensors import safe_open

    from iterflow.io import load_tensors

    tensors = load_tensors(path, argument)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if (
        set(tensors) - {"labels"} != {"data", "noise"}
        or tensors["data"].shape != tensors["noise"].shape
        or ("labels" in tensors and shapes["labels"] != shapes["data"][:1])
    ):
        fail(
            argument,
            "must hold tensors 'data' and 'noise' of equal shape (and optional (n,) 'labels')",
            shapes,
        )
    with safe_open(str(path), framework="pt") as fh:
        info = dict(fh.metadata() or {})
    return Pairs(data=tensors["data"], noise=tensors["noise"], labels=tensors.get("labels")), info
