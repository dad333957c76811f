r"""Density ratios ``log q(x)/p(x)`` from samples: telescopic, one classifier, kernel densities.

Three estimators share one face, :class:`RatioEstimator` (``log_ratio(x)``, ``save``, and
:func:`load_ratio`):

* :class:`TelescopicRatio` (:func:`fit_telescopic`): classifiers between *consecutive* members of a
  chain ``p = rho_0, rho_1, ..., rho_K = q`` whose intermediate members are particles of a flow
  that transports ``p`` to ``q`` (Rhodes, Xu & Gutmann 2020, arXiv 2006.12204; Choi, Meng & Ermon
  2022, arXiv 2111.11010; Xu, Cheng & Xie, AISTATS 2025, arXiv 2305.11857).
* :class:`ClassifierRatio` (:func:`fit_classifier`): one logistic classifier between ``p``, ``q``.
* :class:`KDERatio` (:func:`fit_kde`): the difference of two Gaussian kernel density estimates
  (scikit-learn ``KernelDensity``), bandwidths chosen by cross-validation (``GridSearchCV``).

**Logistic loss.** For densities ``f0`` (label 0) and ``f1`` (label 1) drawn in equal numbers,

.. math::
    \ell(\phi) = E_{f_0} \log(1 + e^{\phi(x)}) + E_{f_1} \log(1 + e^{-\phi(x)})

is minimised pointwise by ``phi*(x) = log f1(x)/f0(x)`` (the minimiser of
``f0 softplus(phi) + f1 softplus(-phi)``; Lemma V.1 of the Xie-Cheng tutorial). Every classifier
here is trained with it, so each logit *is* a log-density-ratio estimate.

**The telescopic estimator, derived.** For any chain of densities
``rho_0 = p, rho_1, ..., rho_K = q`` that are positive where ``x`` lies, the identity

.. math::
    \log\frac{q(x)}{p(x)} = \sum_{k=0}^{K-1} \log\frac{\rho_{k+1}(x)}{\rho_k(x)}

holds *at the same fixed point* ``x`` (the sum telescopes). Each term is the minimiser of the
logistic loss between samples of ``rho_k`` (label 0) and ``rho_{k+1}`` (label 1), so training
classifiers ``phi_k`` on consecutive pairs and returning ``sum_k phi_k(x)`` is a consistent
estimator whatever the chain is, as long as its *ends* are exactly ``p`` and ``q``. The flow only
decides how easy each classification is: with a flow ``T_t`` carrying ``p`` (``t = 0``) to ``q``
(``t = 1``) and times ``t_k = k / K``, the intermediate members are

.. math::
    \rho_k = \tfrac12 \big( (T_{t_k})_\# p + (T_{t_k} \circ T_1^{-1})_\# q \big), \quad 0 < k < K,

the source particles pushed forward to ``t_k`` mixed with the target particles pulled back to
``t_k`` (``particles="both"``; ``"source"`` or ``"target"`` keep one of the two). Neighbours
overlap, so every classifier sees a well-posed, balanced problem, unlike one classifier between
``p`` and ``q`` whose supports barely meet (the "density chasm" of Rhodes et al.). The ends
``rho_0 = p`` and ``rho_K = q`` are the *samples themselves*, not the flow's images of them, so an
imperfect flow (``T_# p != q``) changes the efficiency but not the consistency of the estimate.

*Evaluation at a point* ``x``: normalise ``u = (x - shift) / scale`` with the flow's normalisation
and return ``sum_{k<K} phi_k(u)``: ``K`` classifier calls, no ODE solve, no log-Jacobian.

Why not pull ``x`` along the flow instead? Transporting both densities by one map leaves their ratio
unchanged, ``log (S_# q)(S x) / (S_# p)(S x) = log q(x)/p(x)``, so moving ``x`` alone needs the
density of ``p`` (or ``q``) at two *different* points, e.g.
``log p(x) = log p_t(T_t x) + int_0^t div v``, and ``p``'s density is exactly what we do not have.
Hence the classifiers act on the fixed ``x`` space between the intermediate densities.

Two parameterisations (``mode``): ``"conditioned"`` uses one network ``phi(u, t)`` evaluated at the
interval midpoints ``t = (k + 1/2) / K`` (the discrete form of the "time score" network of Choi et
al. and Xu et al.); ``"separate"`` trains one classifier per interval.

*Limits.* Where ``p`` and ``q`` do not overlap, ``log q(x)/p(x)`` at a point of ``p`` depends on the
tail of ``q`` there, which no sample shows: every estimator must extrapolate. Here each ``phi_k`` is
extrapolated from the region where ``rho_k`` and ``rho_{k+1}`` live (roughly linearly for SiLU
networks), which is far better behaved than one classifier on separable data (whose logits grow
without bound) or kernel tails (``-|x - x_i|^2 / 2h^2``), but the error still grows with the
distance between the supports and is sensitive to the classifier's training length.

All estimators work on affinely normalised coordinates ``u = (x - shift) / scale``; the log ratio is
invariant under a map applied to both densities (the Jacobians cancel), so no correction is needed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from iterflow.core.flow import Flow
from iterflow.core.nn import ACTIVATIONS, FourierTime, time_column
from iterflow.errors import Registry, check_choice, check_finite, check_positive, fail
from iterflow.io import FORMAT_VERSION, load_json, load_tensors, save_json, save_tensors
from iterflow.train import cosine_lr as train_cosine_lr
from iterflow.train import standardization

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
"""``progress(phase, step, total, terms)``: called during training (the CLI draws a bar from it)."""

RATIO_CONFIG, RATIO_WEIGHTS = "ratio.json", "ratio.safetensors"


# ------------------------------------------------------------------------------------------------
# Classifier networks and the logistic loss
# ------------------------------------------------------------------------------------------------


class LogitNet(nn.Module):
    """An MLP logit ``phi(u)`` or, time-conditioned, ``phi(u, t)``; returns shape ``(B,)``.

    Arguments:
        dim: dimension of ``u``.
        hidden: hidden widths.
        activation: name in :data:`iterflow.nn.ACTIVATIONS`.
        time_conditioned: take a time ``t`` (0-dim or ``(B,)``) as a second input.
        time_freqs: Fourier frequencies of the time embedding (0: raw ``t``).

    Example:
        >>> net = LogitNet(2, hidden=(16,))
        >>> net(torch.zeros(5, 2)).shape
        torch.Size([5])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (128, 128),
        activation: str = "silu",
        time_conditioned: bool = False,
        time_freqs: int = 0,
    ) -> None:
        super().__init__()
        check_positive(dim, "dim", integer=True)
        _check_hidden(hidden, "hidden")
        act = ACTIVATIONS.get(activation, "activation")
        check_positive(time_freqs, "time_freqs", integer=True, allow_zero=True)
        self.dim, self.hidden, self.activation = dim, tuple(hidden), activation
        self.time_conditioned, self.time_freqs = time_conditioned, time_freqs
        self.time = FourierTime(time_freqs) if time_conditioned and time_freqs > 0 else None
        self.inp = nn.Linear(dim, hidden[0])
        if time_conditioned:
            n_time = self.time.out_features if self.time is not None else 1
            self.inp_t = nn.Linear(n_time, hidden[0], bias=False)
        layers: list[nn.Module] = [act()]
        for a, b in zip(hidden[:-1], hidden[1:]):
            layers += [nn.Linear(a, b), act()]
        self.body = nn.Sequential(*layers, nn.Linear(hidden[-1], 1))

    def forward(self, u: Tensor, t: Tensor | float | None = None) -> Tensor:
        h = self.inp(u)  # (B, H)
        if self.time_conditioned:
            if t is None:
                fail("t", "must be given to a time-conditioned classifier", t)
            tc = time_column(t, u)  # (B, 1) or (1, 1)
            h = h + self.inp_t(self.time(tc) if self.time is not None else tc)
        return self.body(h).squeeze(-1)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "time_conditioned": self.time_conditioned,
            "time_freqs": self.time_freqs,
        }


def _check_hidden(hidden: Sequence[int], argument: str) -> None:
    if isinstance(hidden, (str, bytes)) or len(hidden) == 0:
        fail(argument, "must list at least one hidden width", hidden)
    for h in hidden:
        check_positive(h, argument, integer=True)


def logistic_loss(logit_0: Tensor, logit_1: Tensor) -> Tensor:
    r"""``mean softplus(phi(x0)) + mean softplus(-phi(x1))``, minimised at ``phi = log f1/f0``.

    Arguments:
        logit_0: ``(n0,)`` logits of samples of ``f0`` (label 0).
        logit_1: ``(n1,)`` logits of samples of ``f1`` (label 1).

    Returns:
        A scalar tensor (differentiable).
    """
    return nn.functional.softplus(logit_0).mean() + nn.functional.softplus(-logit_1).mean()


@dataclass(frozen=True)
class ClassifierOptions:
    """Network and optimisation of a logistic classifier.

    Attributes:
        hidden, activation, time_freqs: the :class:`LogitNet` (``time_freqs`` only matters for
            time-conditioned networks).
        steps: Adam steps.
        batch_size: samples drawn from *each* class per step (per interval for telescopic training).
        lr: peak learning rate (linear warm-up over 5% of the steps, cosine decay to 5%).
        weight_decay: AdamW weight decay (0: Adam).
        grad_clip: gradient-norm clip (0 disables).
    """

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "silu"
    time_freqs: int = 0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _check_hidden(self.hidden, "hidden")
        ACTIVATIONS.get(self.activation, "activation")
        check_positive(self.time_freqs, "time_freqs", integer=True, allow_zero=True)
        check_positive(self.steps, "steps", integer=True)
        check_positive(self.batch_size, "batch_size", integer=True)
        check_positive(self.lr, "lr")
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip", allow_zero=True)


def cosine_lr(lr: float, step: int, steps: int) -> float:
    """:func:`iterflow.train.cosine_lr` with a linear warm-up over 5% of ``steps``."""
    return train_cosine_lr(lr, step, steps, max(1, steps // 20))


def optimize(
    params: Sequence[Tensor],
    loss_fn: Callable[[int], Tensor],
    options: ClassifierOptions,
    *,
    phase: str,
    progress: ProgressFn | None = None,
) -> float:
    """Minimise ``loss_fn(step)`` over ``params`` with Adam(W), the cosine schedule and clipping.

    Returns:
        The mean loss over the last 10% of the steps.
    """
    params = list(params)
    opt_cls = torch.optim.AdamW if options.weight_decay > 0 else torch.optim.Adam
    opt = opt_cls(params, lr=options.lr, weight_decay=options.weight_decay)
    tail, tail_n = 0.0, 0
    every = max(1, options.steps // 100)
    for step in range(options.steps):
        loss = loss_fn(step)
        _step(opt, params, loss, cosine_lr(options.lr, step, options.steps), options.grad_clip)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{phase}: loss became {value} at step {step + 1}; lower lr")
        if step >= options.steps - max(1, options.steps // 10):
            tail, tail_n = tail + value, tail_n + 1
        if progress is not None and ((step + 1) % every == 0 or step + 1 == options.steps):
            progress(phase, step + 1, options.steps, {"loss": value})
    return tail / max(tail_n, 1)


def _step(
    opt: torch.optim.Optimizer, params: list[Tensor], loss: Tensor, lr: float, clip: float
) -> None:
    """One optimiser step on ``loss`` at learning rate ``lr``, clipping the gradient norm to ``clip``
    (0: no clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def _draw(bank: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rows of ``bank`` drawn uniformly with replacement."""
    idx = torch.randint(0, bank.shape[0], (n,), generator=generator, device=generator.device)
    return bank[idx.to(bank.device)]


# ------------------------------------------------------------------------------------------------
# Common face
# ------------------------------------------------------------------------------------------------


def _check_points(x: Any, argument: str, dim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        fail(argument, "must be a torch.Tensor", type(x).__name__)
    if x.ndim != 2 or x.shape[0] < 1 or (dim is not None and x.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        fail(argument, f"must have shape {want} with n >= 1", tuple(x.shape))
    if not x.is_floating_point():
        fail(argument, "must be a floating-point tensor", str(x.dtype))
    check_finite(x, argument)
    return x


def pooled_standardization(source: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation of the pooled samples (floored at 1e-6)."""
    return standardization(torch.cat([source, target]), "dim")


class RatioEstimator(ABC):
    """An estimate of ``log q(x)/p(x)`` (``p``: source, ``q``: target).

    Subclasses set ``kind`` and implement :meth:`log_ratio` and the state round trip used by
    :meth:`save` / :func:`load_ratio` (JSON + safetensors; nothing is unpickled).
    """

    kind: ClassVar[str]

    def __init__(self, shift: Tensor, scale: Tensor) -> None:
        self.shift, self.scale = shift.detach(), scale.detach()

    @property
    def dim(self) -> int:
        return int(self.shift.shape[0])

    def normalize(self, x: Tensor) -> Tensor:
        """Data units -> the estimator's coordinates ``u = (x - shift) / scale``."""
        return (x - self.shift.to(x)) / self.scale.to(x)

    def log_ratio(self, x: Tensor, chunk: int = 8192) -> Tensor:
        """``log q(x)/p(x)`` for points ``x`` of shape ``(n, d)`` (data units) -> ``(n,)``."""
        x = _check_points(x, "x", self.dim)
        with torch.no_grad():
            return torch.cat([self._log_ratio_u(self.normalize(c)) for c in x.split(chunk)])

    def __call__(self, x: Tensor) -> Tensor:
        return self.log_ratio(x)

    @abstractmethod
    def _log_ratio_u(self, u: Tensor) -> Tensor:
        """Log ratio at normalised points ``u`` ``(n, d)`` -> ``(n,)``."""

    @abstractmethod
    def _state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``(JSON config, tensors)`` that :meth:`_from_state` rebuilds the estimator from."""

    @classmethod
    @abstractmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> RatioEstimator:
        """Inverse of :meth:`_state`."""

    def save(self, folder: str | Path) -> Path:
        """Write ``ratio.json`` and ``ratio.safetensors`` into ``folder`` (created); returns it."""
        folder = Path(folder)
        config, tensors = self._state()
        save_tensors(folder / RATIO_WEIGHTS, {**tensors, "shift": self.shift, "scale": self.scale})
        save_json(
            folder / RATIO_CONFIG, {"format_version": FORMAT_VERSION, "kind": self.kind, **config}
        )
        return folder


ESTIMATORS: Registry[type[RatioEstimator]] = Registry("ratio estimator")


def load_ratio(folder: str | Path, device: str | torch.device = "cpu") -> RatioEstimator:
    """Load an estimator written by :meth:`RatioEstimator.save` (InputError on a bad folder)."""
    folder = Path(folder)
    config = load_json(folder / RATIO_CONFIG, "ratio")
    if not isinstance(config, dict) or config.get("format_version", 0) > FORMAT_VERSION:
        fail(
            "ratio",
            f"{RATIO_CONFIG} must be a ratio config of format <= {FORMAT_VERSION}",
            str(folder),
        )
    cls = ESTIMATORS.get(config.get("kind"), "ratio kind")
    tensors = load_tensors(folder / RATIO_WEIGHTS, "ratio", device)
    if "shift" not in tensors or "scale" not in tensors:
        fail("ratio", f"{RATIO_WEIGHTS} must hold 'shift' and 'scale'", str(folder))
    try:
        return cls._from_state(config, tensors)
    except (KeyError, RuntimeError, TypeError) as e:
        fail(
            "ratio",
            f"{RATIO_WEIGHTS} must match {RATIO_CONFIG} ({type(e).__name__}: {e})",
            str(folder),
        )


def _load_module(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> nn.Module:
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    like = next((p for p in tensors.values() if p.is_floating_point()), None)
    if like is not None:
        module = module.to(device=like.device, dtype=like.dtype)
    module.load_state_dict(state)
    return module.eval()


def _prefixed(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Telescopic estimator
# ------------------------------------------------------------------------------------------------

MODES = ("conditioned", "separate")
PARTICLES = ("both", "source", "target")


@dataclass(frozen=True)
class TelescopicOptions:
    """Options of :func:`fit_telescopic`.

    Attributes:
        intervals: number ``K`` of consecutive pairs ``(rho_k, rho_{k+1})``; a multiple of the
            flow's number of blocks (the times ``t_k = k/K`` then fall on a uniform grid in every
            block).
        mode: ``"conditioned"`` (one network ``phi(u, t)``) or ``"separate"`` (one per interval).
        particles: intermediate members from ``"both"`` directions (source pushed forward mixed with
            target pulled back), only the ``"source"`` or only the ``"target"``.
        substeps: fixed ``rk4`` steps between consecutive times when moving the particles.
        classifier: network and optimisation (``batch_size`` is per class and interval).
    """

    intervals: int = 16
    mode: str = "conditioned"
    particles: str = "both"
    substeps: int = 2
    classifier: ClassifierOptions = ClassifierOptions(time_freqs=4, batch_size=64)

    def __post_init__(self) -> None:
        check_positive(self.intervals, "intervals", integer=True)
        check_choice(self.mode, MODES, "mode")
        check_choice(self.particles, PARTICLES, "particles")
        check_positive(self.substeps, "substeps", integer=True)
        if not isinstance(self.classifier, ClassifierOptions):
            fail("classifier", "must be a ClassifierOptions", type(self.classifier).__name__)


class IntervalLogits(nn.Module):
    """The logits ``phi_k(u)`` of the ``K`` intervals: one time-conditioned net or ``K`` nets.

    In ``"conditioned"`` mode ``phi_k(u) = phi(u, (k + 1/2) / K)``.
    """

    def __init__(self, dim: int, intervals: int, mode: str, options: ClassifierOptions) -> None:
        super().__init__()
        check_choice(mode, MODES, "mode")
        self.intervals, self.mode = intervals, mode
        kw = {"hidden": options.hidden, "activation": options.activation}
        if mode == "conditioned":
            self.nets = nn.ModuleList(
                [LogitNet(dim, time_conditioned=True, time_freqs=options.time_freqs, **kw)]
            )
        else:
            self.nets = nn.ModuleList([LogitNet(dim, **kw) for _ in range(intervals)])

    def times(self, like: Tensor) -> Tensor:
        """Interval midpoints ``(K,)``."""
        return (
            torch.arange(self.intervals, dtype=like.dtype, device=like.device) + 0.5
        ) / self.intervals

    def forward(self, u: Tensor, k: Tensor) -> Tensor:
        """Logits of rows ``u`` ``(B, d)`` for their intervals ``k`` ``(B,)`` (long) -> ``(B,)``."""
        if self.mode == "conditioned":
            return self.nets[0](u, self.times(u)[k])
        out = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)
        for j in torch.unique(k).tolist():
            rows = k == j
            out[rows] = self.nets[j](u[rows])
        return out

    def all_intervals(self, u: Tensor) -> Tensor:
        """``phi_k(u)`` for every interval: ``(B, K)``."""
        b, kk = u.shape[0], self.intervals
        if self.mode == "conditioned":
            t = self.times(u).repeat_interleave(b)  # (K B,)
            return self.nets[0](u.repeat(kk, 1), t).reshape(kk, b).T
        return torch.stack([net(u) for net in self.nets], 1)


class TelescopicRatio(RatioEstimator):
    """``log q(x)/p(x) = sum_k phi_k(u)`` with ``u`` the flow's normalisation of ``x``.

    Build it with :func:`fit_telescopic`; see the module docstring for the derivation.
    """

    kind = "telescopic"

    def __init__(
        self, logits: IntervalLogits, shift: Tensor, scale: Tensor, options: TelescopicOptions
    ) -> None:
        super().__init__(shift, scale)
        self.logits, self.options = logits.eval(), options

    def _log_ratio_u(self, u: Tensor) -> Tensor:
        return self.interval_log_ratios_u(u).sum(1)

    def interval_log_ratios_u(self, u: Tensor) -> Tensor:
        """The terms ``log rho_{k+1}(x)/rho_k(x)`` at normalised points: ``(n, K)``."""
        return self.logits.all_intervals(u.to(self.shift.dtype)).to(u.dtype)

    def interval_log_ratios(self, x: Tensor) -> Tensor:
        """The terms ``log rho_{k+1}(x)/rho_k(x)`` at points ``x`` (data units): ``(n, K)``."""
        x = _check_points(x, "x", self.dim)
        with torch.no_grad():
            return self.interval_log_ratios_u(self.normalize(x))

    def _state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        cfg = {"dim": self.dim, "options": _options_json(self.options)}
        return cfg, _prefixed(self.logits, "logits.")

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> TelescopicRatio:
        options = _telescopic_options_from_json(config["options"])
        logits = IntervalLogits(
            int(config["dim"]), options.intervals, options.mode, options.classifier
        )
        _load_module(logits, tensors, "logits.")
        return cls(logits, tensors["shift"], tensors["scale"], options)


ESTIMATORS.register("telescopic", TelescopicRatio)


def _options_json(options: TelescopicOptions) -> dict[str, Any]:
    d = asdict(options)
    d["classifier"]["hidden"] = list(options.classifier.hidden)
    return d


def _telescopic_options_from_json(d: dict[str, Any]) -> TelescopicOptions:
    d = dict(d)
    d["classifier"] = ClassifierOptions(**d["classifier"])
    return TelescopicOptions(**d)


@torch.no_grad()
def chain_particles(
    flow: Flow,
    source: Tensor,
    target: Tensor,
    intervals: int,
    *,
    particles: str = "both",
    substeps: int = 2,
    chunk: int = 8192,
) -> list[Tensor]:
    """Samples of ``rho_0 = p, rho_1, ..., rho_K = q`` in the flow's model units.

    Arguments:
        flow: a transport flow carrying ``p`` (start of the first block) to ``q`` (end of the last);
            its ``encode`` is the forward map in model units.
        source, target: ``(n, d)`` and ``(m, d)`` samples of ``p`` and ``q`` (data units).
        intervals: ``K``, a multiple of ``flow.num_blocks``.
        particles: ``"both"``, ``"source"`` or ``"target"`` (see :class:`TelescopicOptions`).
        substeps: ``rk4`` steps between consecutive times.

    Returns:
        ``K + 1`` tensors; the first is ``normalize(source)``, the last ``normalize(target)``.
    """
    check_choice(particles, PARTICLES, "particles")
    blocks = flow.num_blocks
    if blocks < 1 or intervals % blocks != 0:
        fail(
            "intervals",
            f"must be a positive multiple of the flow's number of blocks ({blocks})",
            intervals,
        )
    per_block = intervals // blocks
    steps = per_block * substeps

    def states(x: Tensor, direction: str) -> list[Tensor]:
        start = flow.normalize(x) if direction == "decode" else x
        parts = [
            flow.trajectory(c, direction=direction, solver="rk4", steps=steps)
            for c in start.split(chunk)
        ]
        traj = flow.normalize(torch.cat(parts, 1))  # (B * steps + 1, n, d), model units
        return list(traj[::substeps].unbind(0))  # K + 1 states on the grid t_k = k / K

    u_p, u_q = flow.normalize(source), flow.normalize(target)
    fwd = states(source, "encode") if particles in ("both", "source") else None
    bwd = states(target, "decode")[::-1] if particles in ("both", "target") else None
    chain = [u_p]
    for k in range(1, intervals):
        members = [s[k] for s in (fwd, bwd) if s is not None]
        chain.append(torch.cat(members))
    chain.append(u_q)
    return chain


def fit_telescopic(
    flow: Flow,
    source: Tensor,
    target: Tensor,
    options: TelescopicOptions | None = None,
    *,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
) -> TelescopicRatio:
    r"""Fit ``log q/p`` by logistic classifiers between consecutive distributions along ``flow``.

    Every optimiser step draws ``batch_size`` points from ``rho_k`` and from ``rho_{k+1}`` for every
    interval ``k`` and minimises the mean of the ``K`` logistic losses, whose minimisers are
    ``phi_k = log rho_{k+1}/rho_k``; the estimate is ``sum_k phi_k(u)`` (see the module docstring).

    Arguments:
        flow: transport flow from ``p`` to ``q`` (e.g. the ``flow`` of a
            :class:`~iterflow.apps.transport.TransportResult`); its normalisation is reused, its
            blocks are not trained.
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q`` (data units, on the flow's
            device).
        options: see :class:`TelescopicOptions`.
        generator: the only source of randomness (initialisation and minibatches).
        progress: optional callback ``(phase, step, total, terms)``.

    Returns:
        A :class:`TelescopicRatio`.

    References:
        Rhodes, Xu & Gutmann, "Telescoping density-ratio estimation", NeurIPS 2020,
        arXiv 2006.12204; Choi, Meng & Ermon, "Density ratio estimation via infinitesimal
        classification", AISTATS 2022, arXiv 2111.11010; Xu, Cheng & Xie, AISTATS 2025,
        arXiv 2305.11857.
    """
    options = options or TelescopicOptions()
    source = _check_points(source, "source", flow.dim)
    target = _check_points(target, "target", flow.dim)
    flow.eval()
    chain = chain_particles(
        flow,
        source,
        target,
        options.intervals,
        particles=options.particles,
        substeps=options.substeps,
    )
    kk, b = options.intervals, options.classifier.batch_size
    logits = _seeded(
        lambda: IntervalLogits(flow.dim, kk, options.mode, options.classifier), generator
    )
    logits = logits.to(device=source.device, dtype=source.dtype)
    k_index = torch.arange(kk, device=source.device).repeat_interleave(b)  # (K b,)

    def loss_fn(step: int) -> Tensor:
        lo = torch.cat([_draw(chain[k], b, generator) for k in range(kk)])  # rho_k, label 0
        hi = torch.cat([_draw(chain[k + 1], b, generator) for k in range(kk)])  # rho_{k+1}, label 1
        return logistic_loss(logits(lo, k_index), logits(hi, k_index))

    logits.train()
    optimize(
        list(logits.parameters()),
        loss_fn,
        options.classifier,
        phase="telescopic classifier",
        progress=progress,
    )
    return TelescopicRatio(
        logits, flow.shift.detach().clone(), flow.scale.detach().clone(), options
    )


def _seeded(build: Callable[[], nn.Module], generator: torch.Generator) -> nn.Module:
    """Build a module with its initialisation seeded from ``generator`` (global RNG untouched)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------


class ClassifierRatio(RatioEstimator):
    """One logistic classifier between ``p`` (label 0) and ``q`` (label 1): ``log q/p = phi(u)``."""

    kind = "classifier"

    def __init__(self, net: LogitNet, shift: Tensor, scale: Tensor) -> None:
        super().__init__(shift, scale)
        self.net = net.eval()

    def _log_ratio_u(self, u: Tensor) -> Tensor:
        return self.net(u.to(self.shift.dtype)).to(u.dtype)

    def _state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        return {"net": self.net.config()}, _prefixed(self.net, "net.")

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> ClassifierRatio:
        net = _load_module(LogitNet(**config["net"]), tensors, "net.")
        return cls(net, tensors["shift"], tensors["scale"])  # type: ignore[arg-type]


ESTIMATORS.register("classifier", ClassifierRatio)


def fit_classifier(
    source: Tensor,
    target: Tensor,
    options: ClassifierOptions | None = None,
    *,
    generator: torch.Generator,
    progress: ProgressFn | None = None,
) -> ClassifierRatio:
    """Baseline: one logistic classifier on ``p`` vs ``q`` (pooled per-dimension standardisation).

    Arguments:
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q``.
        options: network and optimisation (``batch_size`` per class).
        generator: the only source of randomness.
        progress: optional callback ``(phase, step, total, terms)``.
    """
    options = options or ClassifierOptions()
    source = _check_points(source, "source")
    target = _check_points(target, "target", source.shape[1])
    shift, scale = pooled_standardization(source, target)
    u_p, u_q = (source - shift) / scale, (target - shift) / scale
    net = _seeded(lambda: LogitNet(source.shape[1], options.hidden, options.activation), generator)
    net = net.to(device=source.device, dtype=source.dtype).train()
    b = options.batch_size

    def loss_fn(step: int) -> Tensor:
        return logistic_loss(net(_draw(u_p, b, generator)), net(_draw(u_q, b, generator)))

    optimize(list(net.parameters()), loss_fn, options, phase="single classifier", progress=progress)
    return ClassifierRatio(net, shift, scale)  # type: ignore[arg-type]


@dataclass(frozen=True)
class KDEOptions:
    """Options of :func:`fit_kde`.

    Attributes:
        bandwidths: candidate bandwidths in standardised units; empty: ``n_bandwidths`` values
            log-spaced from ``0.05`` to ``2`` times Scott's factor ``n^{-1/(d+4)}``.
        n_bandwidths: size of the default grid.
        folds: cross-validation folds (``GridSearchCV`` with unshuffled ``KFold``: deterministic).
        max_points: at most this many points per side are kept (evenly spaced) to bound the cost.
    """

    bandwidths: tuple[float, ...] = ()
    n_bandwidths: int = 16
    folds: int = 5
    max_points: int = 5000

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidths", tuple(float(b) for b in self.bandwidths))
        for bw in self.bandwidths:
            check_positive(bw, "bandwidths")
        check_positive(self.n_bandwidths, "n_bandwidths", integer=True)
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            fail("folds", "must be an integer >= 2", self.folds)
        check_positive(self.max_points, "max_points", integer=True)


class KDERatio(RatioEstimator):
    """``log q_kde(u) - log p_kde(u)`` with Gaussian kernels (scikit-learn ``KernelDensity``)."""

    kind = "kde"

    def __init__(
        self,
        points_p: Tensor,
        points_q: Tensor,
        bandwidth_p: float,
        bandwidth_q: float,
        shift: Tensor,
        scale: Tensor,
    ) -> None:
        super().__init__(shift, scale)
        from sklearn.neighbors import KernelDensity

        self.points_p, self.points_q = points_p.detach(), points_q.detach()
        self.bandwidth_p, self.bandwidth_q = float(bandwidth_p), float(bandwidth_q)
        self._kde_p = KernelDensity(bandwidth=self.bandwidth_p).fit(_np(self.points_p))
        self._kde_q = KernelDensity(bandwidth=self.bandwidth_q).fit(_np(self.points_q))

    def _log_ratio_u(self, u: Tensor) -> Tensor:
        uu = _np(u)
        out = self._kde_q.score_samples(uu) - self._kde_p.score_samples(uu)
        return torch.as_tensor(out, dtype=u.dtype, device=u.device)

    def _state(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        cfg = {"bandwidth_p": self.bandwidth_p, "bandwidth_q": self.bandwidth_q}
        return cfg, {"points_p": self.points_p, "points_q": self.points_q}

    @classmethod
    def _from_state(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> KDERatio:
        return cls(
            tensors["points_p"],
            tensors["points_q"],
            float(config["bandwidth_p"]),
            float(config["bandwidth_q"]),
            tensors["shift"],
            tensors["scale"],
        )


ESTIMATORS.register("kde", KDERatio)


def _np(x: Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _evenly(x: Tensor, k: int) -> Tensor:
    if x.shape[0] <= k:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, k).round().long().to(x.device)]


def cv_bandwidth(points: Tensor, bandwidths: Sequence[float], folds: int) -> float:
    """The bandwidth of a Gaussian KDE with the best ``folds``-fold held-out log-likelihood."""
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neighbors import KernelDensity

    search = GridSearchCV(KernelDensity(), {"bandwidth": list(bandwidths)}, cv=KFold(folds))
    search.fit(_np(points))
    return float(search.best_params_["bandwidth"])


def fit_kde(source: Tensor, target: Tensor, options: KDEOptions | None = None) -> KDERatio:
    """Baseline: Gaussian KDEs of ``p`` and ``q`` with cross-validated bandwidths.

    Both sides are standardised with the pooled per-dimension mean and standard deviation first.

    Arguments:
        source, target: ``(n, d)``, ``(m, d)`` samples of ``p`` and ``q``.
        options: bandwidth grid, folds and point cap (see :class:`KDEOptions`).
    """
    options = options or KDEOptions()
    source = _check_points(source, "source")
    target = _check_points(target, "target", source.shape[1])
    shift, scale = pooled_standardization(source, target)
    u_p = _evenly((source - shift) / scale, options.max_points)
    u_q = _evenly((target - shift) / scale, options.max_points)
    bws = []
    for u in (u_p, u_q):
        grid = options.bandwidths
        if not grid:
            scott = u.shape[0] ** (-1.0 / (u.shape[1] + 4)) * float(u.std(0).mean())
            grid = tuple(np.geomspace(0.05 * scott, 2.0 * scott, options.n_bandwidths).tolist())
        bws.append(cv_bandwidth(u, grid, options.folds))
    return KDERatio(u_p, u_q, bws[0], bws[1], shift, scale)


def log_ratio_mse(estimate: Tensor, truth: Tensor) -> float:
    """Mean squared error ``mean (estimate - truth)^2`` (float64)."""
    if estimate.shape != truth.shape:
        fail(
            "estimate", f"must have the shape of truth {tuple(truth.shape)}", tuple(estimate.shape)
        )
    return float((estimate.double() - truth.double()).pow(2).mean())
