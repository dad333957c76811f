"""The logistic classifiers of flow OT and density-ratio estimation: the logit network
:class:`LogitNet`, the per-interval logits of the telescopic estimator :class:`IntervalLogits`, and
their optimisation settings :class:`ClassifierOptions`.

Every classifier here is trained on the two-sample logistic loss
(:func:`iterflow.methods.classifier.logistic_loss`), minimised by ``phi* = log f1 / f0``, so each
logit *is* a log-density-ratio estimate (the tutorial's Lemma V.1; METHODS.md section 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.core.nn import ACTIVATIONS, FourierTime, stacked_linear, time_column
from iterflow.errors import check_choice, check_positive, fail
from iterflow.train import OptimConfig

MODES = ("conditioned", "separate")


def check_hidden(hidden: Sequence[int], argument: str) -> None:
    """Fail unless ``hidden`` lists at least one positive integer width."""
    if isinstance(hidden, (str, bytes)) or len(hidden) == 0:
        fail(argument, "must list at least one hidden width", hidden)
    for h in hidden:
        check_positive(h, argument, integer=True)


class LogitNet(nn.Module):
    """An MLP logit ``phi(u)`` or, time-conditioned, ``phi(u, t)``; returns shape ``(B,)``.

    Arguments:
        dim: dimension of ``u``.
        hidden: hidden widths.
        activation: name in :data:`iterflow.core.nn.ACTIVATIONS`.
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
        check_hidden(hidden, "hidden")
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
        # the input layer as one product with (k, H) weights (stacked_linear: a faster gradient)
        inputs, weights, shared = [u], [self.inp.weight], None
        if self.time_conditioned:
            if t is None:
                fail("t", "must be given to a time-conditioned classifier", t)
            tc = time_column(t, u)  # (B, 1) or (1, 1)
            tf = (self.time(tc) if self.time is not None else tc).to(u.dtype)
            if tf.shape[0] == u.shape[0]:  # a time per row: side by side with u
                inputs, weights = [u, tf], [self.inp.weight, self.inp_t.weight]
            else:  # one time for all rows: its term broadcasts
                shared = self.inp_t(tf)
        h = stacked_linear(inputs, weights, self.inp.bias)
        return self.body(h if shared is None else h + shared).squeeze(-1)

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "time_conditioned": self.time_conditioned,
            "time_freqs": self.time_freqs,
        }


@dataclass(frozen=True)
class ClassifierOptions:
    """Network and optimisation of a logistic classifier.

    Attributes:
        hidden, activation, time_freqs: the :class:`LogitNet` (``time_freqs`` only matters for
            time-conditioned networks).
        steps: optimiser steps.
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
        check_hidden(self.hidden, "hidden")
        ACTIVATIONS.get(self.activation, "activation")
        check_positive(self.time_freqs, "time_freqs", integer=True, allow_zero=True)
        check_positive(self.steps, "steps", integer=True)
        check_positive(self.batch_size, "batch_size", integer=True)
        check_positive(self.lr, "lr")
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip", allow_zero=True)

    def optim_config(self, checkpoint_every: int = 500) -> OptimConfig:
        """The loop's settings: Adam(W), warm-up over 5% of the steps, cosine decay, no EMA."""
        return OptimConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=max(1, self.steps // 20),
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            checkpoint_every=checkpoint_every,
            log_every=max(1, self.steps // 100),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON values (``hidden`` as a list)."""
        return {**asdict(self), "hidden": list(self.hidden)}


class IntervalLogits(nn.Module):
    r"""The logits ``phi_k(u)`` of the ``K`` intervals: one time-conditioned net or ``K`` nets,
    optionally plus a quadratic form per interval.

    In ``"conditioned"`` mode ``phi_k(u) = phi(u, (k + 1/2) / K)``. With ``quadratic``,
    ``phi_k(u) + u^T A_k u + b_k^T u`` with ``A_k`` symmetric (``(K, d, d)`` and ``(K, d)``
    parameters, zero at the start): the log ratio of two Gaussians is exactly such a form, and
    the quadratic part carries the classifier's estimate *away* from the samples it was trained on,
    where an MLP alone extrapolates (almost) linearly.

    Arguments:
        dim: dimension of ``u``.
        intervals: ``K``.
        mode: ``"conditioned"`` or ``"separate"``.
        options: the networks' widths, activation and time embedding.
        quadratic: add the quadratic forms.
    """

    def __init__(
        self, dim: int, intervals: int, mode: str, options: ClassifierOptions,
        quadratic: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        check_choice(mode, MODES, "mode")
        self.intervals, self.mode, self.quadratic = intervals, mode, quadratic
        if quadratic:
            self.quad = nn.Parameter(torch.zeros(intervals, dim, dim))
            self.lin = nn.Parameter(torch.zeros(intervals, dim))
        kw: dict[str, Any] = {"hidden": options.hidden, "activation": options.activation}
        if mode == "conditioned":
            self.nets = nn.ModuleList(
                [LogitNet(dim, time_conditioned=True, time_freqs=options.time_freqs, **kw)]
            )
        else:
            self.nets = nn.ModuleList([LogitNet(dim, **kw) for _ in range(intervals)])

    def times(self, like: Tensor) -> Tensor:
        """Interval midpoints ``(K,)``."""
        k = torch.arange(self.intervals, dtype=like.dtype, device=like.device)
        return (k + 0.5) / self.intervals

    def forward(self, u: Tensor, k: Tensor) -> Tensor:
        """Logits of rows ``u`` ``(B, d)`` for their intervals ``k`` ``(B,)`` (long) -> ``(B,)``."""
        if self.mode == "conditioned":
            out = self.nets[0](u, self.times(u)[k])
        else:
            out = torch.empty(u.shape[0], dtype=u.dtype, device=u.device)
            for j in torch.unique(k).tolist():
                rows = k == j
                out[rows] = self.nets[j](u[rows])
        if self.quadratic:
            out = out + torch.einsum("bi,bij,bj->b", u, self.quad[k], u) + (u * self.lin[k]).sum(1)
        return out

    def all_intervals(self, u: Tensor) -> Tensor:
        """``phi_k(u)`` for every interval: ``(B, K)``."""
        b, kk = u.shape[0], self.intervals
        if self.mode == "conditioned":
            t = self.times(u).repeat_interleave(b)  # (K B,)
            out = self.nets[0](u.repeat(kk, 1), t).reshape(kk, b).T
        else:
            out = torch.stack([net(u) for net in self.nets], 1)
        if self.quadratic:
            out = out + torch.einsum("bi,kij,bj->bk", u, self.quad, u) + u @ self.lin.T
        return out
