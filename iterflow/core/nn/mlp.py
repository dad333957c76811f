"""Velocity networks ``v(x, t)``: one signature everywhere, ``model(x, t) -> (B, *E)``.

``t`` is a 0-dim tensor (all samples at the same time, as inside an ODE solver) or a ``(B,)``
tensor (one time per sample, as in flow-matching training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iterflow.core.nn.mlp_jacobian import velocity_and_jacobian_terms
from iterflow.core.nn.precision import autocast_on, evaluation_unrounded, unrounded_linear
from iterflow.errors import Registry, check_positive, fail

ACTIVATIONS: Registry[type[nn.Module]] = Registry("activation")
ACTIVATIONS.register("silu", nn.SiLU)
ACTIVATIONS.register("tanh", nn.Tanh)
ACTIVATIONS.register("softplus", nn.Softplus)
ACTIVATIONS.register("relu", nn.ReLU)
ACTIVATIONS.register("gelu", nn.GELU)


def time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(B, 1)`` or ``(1, 1)`` tensor on ``x``'s device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1)


class FourierTime(nn.Module):
    """Time features ``[t, sin(2 pi k t), cos(2 pi k t)]`` for ``k = 1..n_freq`` (fixed, not learned)."""

    def __init__(self, n_freq: int) -> None:
        super().__init__()
        self.register_buffer(
            "freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32)
        )
        self.out_features = 1 + 2 * n_freq

    def forward(self, t: Tensor) -> Tensor:  # (B, 1) -> (B, 1 + 2 n_freq)
        ang = t * self.freqs.to(t.dtype)  # type: ignore[operator]
        return torch.cat([t, ang.sin(), ang.cos()], dim=1)


class FourierInput(nn.Module):
    """Random Fourier features of the input, ``[sin(x F), cos(x F)]`` with a fixed matrix
    ``F = 2 pi * scale * N(0, 1)^{d x n}`` (Tancik et al., "Fourier features let networks learn
    high frequency functions in low dimensional domains", NeurIPS 2020).

    A ReLU or SiLU MLP on raw coordinates learns high frequencies slowly (its spectral bias); these
    features hand the first layer oscillations of about ``scale`` cycles per unit of the
    (standardised) data, which is what thin structures such as the branches of the img2d tree
    need. ``F`` is drawn once from the global generator at construction (seeded per block by the
    trainer) and kept as a buffer, so it is saved and loaded with the weights.

    Example:
        >>> f = FourierInput(2, 3, scale=1.0)
        >>> f(torch.zeros(4, 2)).shape, f.out_features
        (torch.Size([4, 6]), 6)
    """

    freqs: Tensor

    def __init__(self, dim: int, n_freq: int, scale: float = 1.0) -> None:
        super().__init__()
        check_positive(n_freq, "x_freqs", integer=True)
        check_positive(scale, "x_scale")
        self.register_buffer("freqs", 2 * math.pi * scale * torch.randn(dim, n_freq))
        self.out_features = 2 * n_freq

    def angles(self, x: Tensor) -> Tensor:
        """``x F`` ``(B, n)`` in ``x``'s precision, also under autocast: phases of tens of radians
        would lose a tenth of a radian in bfloat16 (the features, in [-1, 1], may be rounded)."""
        with torch.autocast(x.device.type, enabled=False):
            return x @ self.freqs.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:  # (B, d) -> (B, 2n)
        ang = self.angles(x)
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    def tangent_map(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``u -> `` the directional derivatives of the features at ``x`` ``(B, d)`` along ``u``
        ``(m, B or 1, d)``: ``[cos(x F) * (u F), -sin(x F) * (u F)]``, ``(m, B, 2n)``. The phases
        are computed once, for all the tangents the map is applied to."""
        ang = self.angles(x)  # (B, n)
        cos, msin = ang.cos(), -ang.sin()
        freqs: Tensor = self.freqs.to(x.dtype)

        def tangents(u: Tensor) -> Tensor:
            du = u @ freqs  # (m, B or 1, n)
            return torch.cat([cos * du, msin * du], dim=-1)

        return tangents


def stacked_linear(
    inputs: Sequence[Tensor], weights: Sequence[Tensor], bias: Tensor | None = None
) -> Tensor:
    """``sum_i inputs[i] @ weights[i].T + bias`` (``inputs[i]``: ``(B, k_i)`` rows) as one product
    of the inputs side by side ``(B, k)`` with the weights stacked as a ``(k, H)`` matrix
    (``weights[i]``: ``(H, k_i)``, as :class:`torch.nn.Linear` keeps them): the input layer of a
    network on few columns.

    Same values as the linear layers (and as :func:`torch.nn.functional.linear` on one input), but
    autograd forms the weights' gradient as ``x^T g``, a ``(k, B) x (B, H)`` product, where for an
    ``(H, k)`` weight used transposed it forms ``(g^T x)^T``, an ``(H, B) x (B, k)`` one that the
    CPU's BLAS runs 1.4-10x slower for ``k`` = 3 to 35 columns (``benchmarks/bench_step_parts.py``,
    its first table); the stacking copies ``k x H`` numbers."""
    x = torch.cat(list(inputs), 1) if len(inputs) > 1 else inputs[0]
    w = torch.cat([v.t() for v in weights], 0)  # (k, H), contiguous
    return torch.addmm(bias, x, w) if bias is not None else x.mm(w)


class MLPVelocity(nn.Module):
    """Time-conditioned MLP velocity field for vectors ``x`` of shape ``(B, dim)``.

    The first layer acts on ``[x, time features]``; it is split into an ``x`` part and a time part so
    that the time term, identical for the whole batch inside an ODE solver, is computed once and
    broadcast instead of concatenated to every row. With ``num_classes > 0`` a learned class embedding
    (one ``hidden[0]`` vector per class, i.e. a first-layer term for a one-hot label) is added too;
    labels come with ``forward(x, t, y)`` or, for code that calls ``model(x, t)`` only (ODE solvers),
    from :meth:`condition`. Label ``num_classes`` is the *null label* ("no class", as in the U-Net),
    used by label dropout and classifier-free guidance (:mod:`iterflow.core.guidance`) and wherever
    no label is given; its embedding row starts at zero.

    Arguments:
        dim: data dimension.
        hidden: widths of the hidden layers, e.g. ``(256, 256, 256)``.
        activation: name in :data:`ACTIVATIONS`.
        time_freqs: number of Fourier frequencies of the time embedding (0: raw ``t`` only).
        zero_init: initialise the output layer to zero (the block starts as the identity map).
        num_classes: number of classes of the label conditioning (0: unconditional).
        x_freqs: number of random Fourier features of ``x`` added to the first layer
            (:class:`FourierInput`; 0: the raw coordinates only).
        x_scale: standard deviation of their frequencies, in cycles per unit of ``x``.

    Example:
        >>> v = MLPVelocity(2, hidden=(32, 32))
        >>> v(torch.zeros(5, 2), torch.tensor(0.5)).shape
        torch.Size([5, 2])
        >>> c = MLPVelocity(2, hidden=(32,), num_classes=3)
        >>> with c.condition(torch.tensor([0, 2])):
        ...     c(torch.zeros(2, 2), torch.tensor(0.5)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        dim: int,
        hidden: Sequence[int] = (256, 256, 256),
        activation: str = "silu",
        time_freqs: int = 0,
        zero_init: bool = False,
        num_classes: int = 0,
        x_freqs: int = 0,
        x_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive(dim, "dim", integer=True)
        check_positive(x_freqs, "x_freqs", integer=True, allow_zero=True)
        check_positive(x_scale, "x_scale")
        check_positive(num_classes, "num_classes", integer=True, allow_zero=True)
        if len(hidden) == 0:
            fail("hidden", "must list at least one hidden width", hidden)
        for h in hidden:
            check_positive(h, "hidden", integer=True)
        act = ACTIVATIONS.get(activation, "activation")
        self.dim, self.hidden, self.activation, self.time_freqs = (
            dim,
            tuple(hidden),
            activation,
            time_freqs,
        )
        self.zero_init = zero_init
        self.time = FourierTime(time_freqs) if time_freqs > 0 else None
        n_time = self.time.out_features if self.time is not None else 1
        self.inp = nn.Linear(dim, hidden[0])
        self.inp_t = nn.Linear(n_time, hidden[0], bias=False)
        self.num_classes = int(num_classes)
        self.inp_y: nn.Embedding | None = None
        if self.num_classes > 0:  # = a bias-free Linear on one-hot labels, initialised like one
            emb = nn.Embedding(self.num_classes, hidden[0])
            bound = 1.0 / math.sqrt(dim + n_time + self.num_classes)
            nn.init.uniform_(emb.weight, -bound, bound)
            # one more row, index num_classes: the null label ("no class"; label dropout and
            # classifier-free guidance), zero at start; appended without a random draw
            null = torch.zeros(1, hidden[0], dtype=emb.weight.dtype)
            weight = torch.cat([emb.weight.detach(), null])
            self.inp_y = nn.Embedding(self.num_classes + 1, hidden[0], _weight=weight)
        self._label: Tensor | None = None
        layers: list[nn.Module] = [act()]
        for a, b in zip(hidden[:-1], hidden[1:]):
            layers += [nn.Linear(a, b), act()]
        out = nn.Linear(hidden[-1], dim)
        self.body = nn.Sequential(*layers, out)
        if zero_init:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        # drawn last, so that networks without them initialise exactly as before
        self.x_freqs, self.x_scale = int(x_freqs), float(x_scale)
        self.fourier: FourierInput | None = None
        self.inp_f: nn.Linear | None = None
        if self.x_freqs > 0:
            self.fourier = FourierInput(dim, self.x_freqs, self.x_scale)
            self.inp_f = nn.Linear(self.fourier.out_features, hidden[0], bias=False)

    @contextmanager
    def condition(self, labels: Tensor | None) -> Iterator[None]:
        """Use ``labels`` (``(B,)`` integers in ``[0, num_classes]``, ``num_classes`` the null
        label) when ``forward`` gets none.

        ``None`` clears them. Labels on an unconditional network (``num_classes=0``) are an error.
        """
        if labels is not None:
            self._check_labels(labels, None)
        old, self._label = self._label, labels
        try:
            yield
        finally:
            self._label = old

    def _check_labels(self, y: Tensor, batch: int | None) -> None:
        if self.num_classes == 0:
            fail("labels", "need a network built with num_classes > 0", tuple(y.shape))
        if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex():
            fail("labels", "must be a (B,) integer tensor", getattr(y, "shape", type(y).__name__))
        if batch is not None and y.shape[0] != batch:
            fail("labels", f"must hold one label per sample, shape ({batch},)", tuple(y.shape))
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            fail(
                "labels",
                f"must lie in [0, {self.num_classes}] ({self.num_classes}: the null label)",
                (int(y.min()), int(y.max())),
            )

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Weights saved before the null label existed (``num_classes`` embedding rows) load with
        a zero null row appended."""
        key = prefix + "inp_y.weight"
        w = state_dict.get(key)
        if self.inp_y is not None and w is not None and w.shape[0] == self.num_classes:
            state_dict[key] = torch.cat([w, w.new_zeros(1, w.shape[1])])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Velocity ``(B, dim)`` at ``x`` ``(B, dim)`` and time ``t`` (0-dim or ``(B,)``); ``y``
        ``(B,)`` class labels of a conditional network, where ``num_classes`` is the null label
        (no label given, here or by :meth:`condition`: the null label for every row). Under
        autocast the hidden layers run in its dtype, the input layer unrounded and, without a
        gradient (evaluation), the output layer too: the velocity comes out in the weights'
        dtype (:mod:`iterflow.core.nn.precision`)."""
        h = self.first_layer(x, t, y)
        if not evaluation_unrounded(x.device.type):
            return self.body(h)
        *hidden, out = self.body  # evaluation under autocast: the output layer unrounded
        for m in hidden:
            h = m(h)
        assert isinstance(out, nn.Linear)
        return unrounded_linear(h, out.weight, out.bias)

    def velocity_and_jacobian_terms(
        self,
        x: Tensor,
        t: Tensor | float,
        probes: Tensor | None = None,
        *,
        frobenius: bool = False,
        y: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """Velocity, divergence and squared Jacobian norm in one forward pass (forward-mode
        tangents; :func:`iterflow.core.nn.mlp_jacobian.velocity_and_jacobian_terms`)."""
        return velocity_and_jacobian_terms(self, x, t, probes, frobenius=frobenius, y=y)

    def first_layer(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Pre-activation ``h_0 = W_0 x + time term (+ class term)`` ``(B, hidden[0])``; under
        autocast the ``x`` and time terms are computed unrounded (:func:`unrounded_linear`)."""
        tc = time_column(t, x)  # (B, 1) or (1, 1)
        tf = self.time(tc) if self.time is not None else tc
        if tf.shape[0] == x.shape[0] > 1:
            # a time per row (training): ONE product of [x, time features] with the two weights
            # side by side, as a concatenating MLP does, instead of two products and an add over
            # the (B, H) result: the demo recipe's steps/s 1.08x, in fp32 1.13x
            # (benchmarks/compare_revisions.py; results/revisions_firstlayer_t2.md). The weights
            # are stacked as a (k, H) matrix, not an (H, k) one used transposed: autograd then
            # forms their gradient as [x, tf]^T g, a (k, B) x (B, H) product, instead of
            # (g^T [x, tf])^T, an (H, B) x (B, k) one that the CPU's BLAS runs 1.8-4.4x slower
            # for few columns k (k = 3 to 35; benchmarks/bench_step_parts.py). Same values and
            # gradients.
            if autocast_on(x.device.type):
                h = self._first_product_unrounded(x, tf)
            else:
                h = stacked_linear(
                    [x, tf.to(x.dtype)], [self.inp.weight, self.inp_t.weight], self.inp.bias
                )
        else:  # (B, H); one time for all rows: broadcast (unrounded under autocast)
            h = unrounded_linear(x, self.inp.weight, self.inp.bias) + unrounded_linear(
                tf, self.inp_t.weight
            )
        if self.fourier is not None and self.inp_f is not None:
            h = h + self.inp_f(self.fourier(x))
        if self.inp_y is not None:
            y = self._label if y is None else y
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            if y.shape != (x.shape[0],):
                fail(
                    "labels",
                    f"must hold one label per sample, shape ({x.shape[0]},)",
                    tuple(y.shape),
                )
            h = h + self.inp_y(y.to(device=x.device, dtype=torch.long)).to(h.dtype)
        elif y is not None:
            self._check_labels(y, x.shape[0])  # raises: unconditional network
        return h

    def _first_product_unrounded(self, x: Tensor, tf: Tensor) -> Tensor:
        """``W_0 x + W_t tf + b_0`` under autocast, in ``x``'s precision: ONE product of
        ``[x, tf, 1]`` with the weights and the bias side by side (no copy of the bias over the
        ``(B, H)`` output, which an ``addmm`` makes first). Its depth is a few columns (``d + 1 +
        2 time_freqs``), where the CPU's bfloat16 kernels cost more than float32's. Measured with
        ``benchmarks/compare_revisions.py`` (two threads, the default 16 time frequencies, the
        flow-matching step under bf16 autocast, rounds paired): 1.18x and 1.08x in two runs of 11
        rounds (``results/revisions_first_fp32_t2.md``, ``revisions_first_autocast_t2.md``), where
        the unchanged float32 step of the second run read 1.06x: a gain of a few percent at most,
        inside this machine's noise; kept because it was never slower and the layer is computed
        unrounded. Without autocast the plain ``addmm`` stays (the folded product read 0.95x)."""
        ones = x.new_ones(x.shape[0], 1)
        with torch.autocast(x.device.type, enabled=False):  # (k, H) weights: see first_layer
            w = torch.cat([self.inp.weight.t(), self.inp_t.weight.t(), self.inp.bias[None, :]], 0)
            return torch.mm(torch.cat([x, tf.to(x.dtype), ones], 1), w.to(x.dtype))

    def input_tangent_map(self, x: Tensor) -> Callable[[Tensor], Tensor]:
        """``u -> `` the directional derivatives of :meth:`first_layer` at ``x`` ``(B, d)`` along
        ``u`` ``(m, B or 1, d)``: ``W_0 u`` plus the Fourier features' term, ``(m, B or 1,
        hidden[0])`` (time and class terms do not depend on ``x``); what depends on ``x`` alone is
        computed once, for every chunk of tangents."""
        w0 = self.inp.weight  # W_0 u unrounded under autocast, as the layer's value
        if self.fourier is None or self.inp_f is None:
            return lambda u: unrounded_linear(u, w0)
        features, w_f = self.fourier.tangent_map(x), self.inp_f.weight
        return lambda u: unrounded_linear(u, w0) + F.linear(features(u), w_f)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (saved with checkpoints; ``num_classes`` only when
        conditional and the Fourier features only when used, so other configs read as before)."""
        cfg = {
            "kind": "mlp",
            "dim": self.dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "time_freqs": self.time_freqs,
            "zero_init": self.zero_init,
        }
        if self.num_classes > 0:
            cfg["num_classes"] = self.num_classes
        if self.x_freqs > 0:
            cfg["x_freqs"], cfg["x_scale"] = self.x_freqs, self.x_scale
        return cfg
