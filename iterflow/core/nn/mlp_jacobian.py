"""Velocity and Jacobian terms of :class:`~iterflow.core.nn.MLPVelocity` in one forward pass.

For ``v(x) = W_L a_{L-1}``, ``a_k = act(h_k)``, ``h_{k+1} = W_{k+1} a_k + b_{k+1}`` and
``h_0 = W_0 x + W_f phi(x) + (time, class terms)`` (``phi``: the optional random Fourier features
of ``x``, :class:`~iterflow.core.nn.mlp.FourierInput`), the directional derivatives
``J u = dv/dx u`` of ``m`` tangents ``u`` travel through the layers with the values (forward-mode
differentiation written out):

.. math::
    T_0 = W_0 u + W_f \\phi'(x) u, \\quad T_{k+1} = W_{k+1} (\\mathrm{act}'(h_k) \\odot T_k),
    \\quad J u = T_L .

The exact terms take the ``d`` basis vectors (``T_0 = W_0 e_i``, the columns of ``W_0``, shared by
every row, plus the features' per-row term): ``tr J = sum_i (J e_i)_i`` and
``||J||_F^2 = sum_i |J e_i|^2``; only the diagonal of the last layer is formed for the trace.
Hutchinson's estimates take ``K`` probes ``eps_k``: ``mean_k eps_k^T J eps_k`` and
``mean_k |J eps_k|^2`` (the forward product; the autograd path of
:func:`iterflow.core.ode.jacobian_terms` uses the backward one, ``|eps_k^T J|^2``, equal in
expectation). The class embedding and the time features add a per-row constant to ``h_0`` and do
not enter the Jacobian.

Cost: the value pass plus ``m`` tangent passes through the hidden layers, as plain tensor operations:
no autograd graph at evaluation, and in training ONE ordinary backward pass through them (the
autograd path differentiates ``m`` vector-Jacobian products, a double backward). The matrix
products are as many as autograd's (``m`` passes through every hidden layer either way), so what
is saved is bookkeeping: measured (CPU, one thread, shared 2-core machine, medians of 15 interleaved
steps in one process) the optimiser step of the rose recipes of CNF (3 x 64 GELU, RK4 over 8 steps,
exact trace and Jacobian norm, batch 512) runs 1.24-1.31 times, JKO-flow's (3 x 128 GELU, RK4 over
3 steps) 1.18-1.22 times as fast as through autograd; evaluation figures are listed with
:data:`TANGENT_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iterflow.core.nn.precision import autocast_on, compiling, output_linear, trace_contraction


class LayeredMLP(Protocol):
    """What this module reads of an MLP velocity (:class:`~iterflow.core.nn.MLPVelocity`): the
    pre-activation ``first_layer(x, t, y)``, the map ``input_tangent_map(x)`` of tangents ``u``
    ``(m, B or 1, d)`` to its derivatives, the ``act, Linear, ..., act, Linear`` chain ``body`` and the
    hidden widths."""

    body: nn.Sequential
    hidden: tuple[int, ...]

    def first_layer(self, x: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor: ...

    def input_tangent_map(self, x: Tensor) -> Callable[[Tensor], Tensor]: ...


#: ``(h, a) -> act'(h)``: an activation's derivative at its input ``h`` (``a = act(h)``), twice
#: differentiable; PyTorch's own derivative kernels where they are.
Slope = Callable[[Tensor, Tensor], Tensor]

#: Bytes of one ``(m, B, H)`` tangent block: the ``d`` (or ``K``) tangents run in chunks of
#: ``m = max(1, TANGENT_BYTES // (B * H * itemsize))`` so that each block stays in the caches.
#: Measured (CPU, one thread, float32, 3 x 256 SiLU, velocity + exact trace, no graph; time of the
#: autograd loop of one backward pass per dimension / time of this pass, medians of 15 interleaved
#: calls on a shared 2-core machine), 2-D: B = 2000: 1.09-1.11 with m = 1 (1.01-1.05 with m = 2),
#: B = 512: 1.11 with m = 2 (0.99 with m = 1), B = 64: 1.71 with m = 2 (1.10 with m = 1); B = 2000
#: at d = 10 / 32 / 64: 1.20 / 1.15 / 1.27 with m = 1 (1.02 / 1.01 / 1.11 with m = 4 / 8 / 16,
#: 0.58 with all 64 at once). The matrix products are the same in both (``d`` passes through the
#: hidden layers), so at large batches the gain is the autograd bookkeeping alone.
TANGENT_BYTES = 1 << 20

_aten = torch.ops.aten


def _silu(h: Tensor, a: Tensor) -> Tensor:
    if not torch.is_grad_enabled():  # one kernel, but one without a derivative of its own
        return _aten.silu_backward(torch.ones_like(h), h)
    sig = torch.sigmoid(h)
    return sig * (1.0 + h * (1.0 - sig))


def activation_and_slope(act: nn.Module, fn: Slope, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(h), act'(h))`` of one hidden layer.

    Eagerly: the activation's own kernel and :data:`Slope`'s (one kernel each for SiLU without a
    gradient). Traced by ``torch.compile``, SiLU is written through one shared ``sigmoid(h)``
    (``h * s`` and ``s * (1 + h (1 - s))``): Inductor fuses both into one loop but does not see
    that ``silu`` and ``silu_backward`` evaluate the same exponential, and computes it twice.
    An exploratory A/B of the compiled one-pass terms (not a scripted figure; 2-D, 2,000 points,
    two threads, interleaved): about 7 % less time per call under bf16; float32 (whose matrix
    products dominate) and the compiled CNF-style training step unchanged.
    ``benchmarks/bench_speed.py --like-parts work-precision`` measures the evaluator as a whole.
    """
    if type(act) is nn.SiLU and compiling():
        sig = torch.sigmoid(h)
        return h * sig, sig * (1.0 + h * (1.0 - sig))
    a = act(h)
    return a, fn(h, a)


def slope(module: nn.Module) -> Slope | None:
    """The :data:`Slope` of a supported activation module (``SiLU``, ``Tanh``, ``ReLU``, ``GELU``
    exact or ``tanh``, ``Softplus``), else ``None``."""
    kind = type(module)
    if kind is nn.SiLU:
        return _silu
    if kind is nn.Tanh:
        return lambda h, a: 1.0 - a * a
    if kind is nn.ReLU:
        return lambda h, a: (h > 0).to(h.dtype)
    if kind is nn.GELU:
        approximate = str(getattr(module, "approximate", "none"))
        return lambda h, a: _aten.gelu_backward(torch.ones_like(h), h, approximate=approximate)
    if kind is nn.Softplus:
        beta, threshold = float(module.beta), float(module.threshold)  # type: ignore[arg-type]
        return lambda h, a: _aten.softplus_backward(torch.ones_like(h), h, beta, threshold)
    return None


def mlp_layers(net: LayeredMLP) -> list[tuple[nn.Module, Slope, nn.Linear]] | None:
    """The hidden-to-output layers of ``net.body`` as ``(activation, slope, linear)``, or ``None``
    when the body is not the ``act, Linear, ..., act, Linear`` chain this module differentiates."""
    mods = list(net.body)
    if len(mods) < 2 or len(mods) % 2:
        return None
    layers = []
    for act, lin in zip(mods[::2], mods[1::2]):
        fn = slope(act)
        if fn is None or type(lin) is not nn.Linear:
            return None
        layers.append((act, fn, lin))
    return layers


#: Traced by ``torch.compile`` under autocast, with the exact trace of at most this many
#: dimensions, the hidden layers add their float32 bias after the product (:func:`hidden_product`).
UNFUSED_BIAS_MAX_DIM = 3


def hidden_product(a: Tensor, lin: nn.Linear, unfused: bool = False) -> Tensor:
    """A hidden layer's pre-activation ``lin(a)``; with ``unfused``, the product plus the bias
    in the bias's own dtype: under bf16 autocast the bf16 product plus the float32 bias, a float32
    pre-activation that carries the product's rounding (the fused layer rounds the sum instead;
    both are within bf16's rounding of the exact value, ``tests/test_compiled_velocity.py``).

    Inductor lowers ``F.linear`` with a bias to an ``addmm`` whose output is first filled with the
    bias (a copy of a ``(B, H)`` block); the unfused sum instead joins the loop that computes the
    activation and its slope, from the float32 pre-activation. Exploratory A/B runs of the
    compiled log-density under bf16 autocast (not scripted figures; 2,000 points, random 3 x 256
    SiLU weights, RK4 with 8 steps, two threads, interleaved in one process, medians of 15-21
    calls): 1.07-1.19x the speed in 2-D (six measurements in four processes), 1.06-1.09x in 3-D,
    but 0.89-1.04x in 4-D, 0.97x in 6-D and 0.86-0.90x in 10 and 32 dimensions, probably because
    the float32 slopes double the memory traffic of the many tangent passes (Inductor also
    schedules the last hidden layer into the trace's contraction loop there). In float32 the
    values are the fused layer's to the bit and the speed did not change (0.95-1.07x), so only
    autocast in at most :data:`UNFUSED_BIAS_MAX_DIM` dimensions takes it;
    ``benchmarks/bench_speed.py --like-parts work-precision`` measures the evaluator's accuracy
    and speed against the plain one.
    """
    if not unfused or lin.bias is None:
        return F.linear(a, lin.weight, lin.bias)
    return F.linear(a, lin.weight) + lin.bias


def _push(t: Tensor, slopes: list[Tensor], linears: list[nn.Linear]) -> Tensor:
    """Tangents ``t`` ``(m, B, H)`` at a pre-activation through the layers (each: times its slope
    ``(B, H)``, then its linear map): ``(m, B, H_out)``."""
    for s, lin in zip(slopes, linears):
        t = F.linear(s * t, lin.weight)
    return t


def velocity_and_jacobian_terms(
    net: LayeredMLP,
    x: Tensor,
    t: Tensor | float,
    probes: Tensor | None = None,
    *,
    frobenius: bool = False,
    y: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Velocity, divergence and (optionally) squared Frobenius norm of ``dv/dx`` of ``net``.

    Arguments:
        net: the MLP velocity.
        x: ``(B, d)`` points; t: time, 0-dim or ``(B,)``.
        probes: ``(K, B, d)`` Hutchinson probes, or ``None`` for the exact terms.
        frobenius: also ``||J||_F^2`` (exact) or ``mean_k |J eps_k|^2`` (probes); else zeros.
        y: ``(B,)`` class labels of a conditional network (as in ``net(x, t, y)``).

    Returns:
        ``(v, div, frob)``: ``(B, d)``, ``(B,)``, ``(B,)``; differentiable by one ordinary backward
        pass. ``None`` when the network's layers are not supported (use autograd).
    """
    layers = mlp_layers(net)
    if layers is None or x.ndim != 2:
        return None
    unfused = (
        probes is None
        and x.shape[1] <= UNFUSED_BIAS_MAX_DIM
        and compiling()
        and autocast_on(x.device.type)
    )
    h = net.first_layer(x, t, y)  # (B, H_0)
    slopes, linears = [], [lin for *_, lin in layers]
    for k, (act, fn, lin) in enumerate(layers):
        a, s = activation_and_slope(act, fn, h)
        slopes.append(s)  # (B, H): act'(h)
        if k == len(layers) - 1:
            h = output_linear(a, lin.weight, lin.bias)  # unrounded in evaluation
        else:
            h = hidden_product(a, lin, unfused)
    v = h  # (B, d)
    w_out = linears[-1].weight  # (d, H_L)
    b, d = x.shape
    first = net.input_tangent_map(x)  # u -> T_0 (phases of Fourier features computed once)
    chunk = max(1, TANGENT_BYTES // (b * max(net.hidden) * x.element_size()))
    divs: list[Tensor] = []
    frobs: list[Tensor] = []
    if probes is None:
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        for i in range(0, d, chunk):
            cols = slice(i, min(i + chunk, d))
            # (m, 1 or B, H_0): the first layer's derivative along e_i (W_0 e_i, shared by the rows,
            # plus a per-row term with Fourier features of x)
            t0 = first(eye[cols].unsqueeze(1))
            tl = slopes[-1] * _push(t0, slopes[:-1], linears[:-1])  # (m, B, H_L)
            if frobenius:
                ju = output_linear(tl, w_out)  # (m, B, d): J e_i
                divs.append(torch.diagonal(ju[:, :, cols], dim1=0, dim2=2).sum(-1))
                frobs.append(ju.pow(2).sum((0, 2)))
            else:
                divs.append(trace_contraction(tl, w_out[cols]))
        scale = 1.0
    else:
        for i in range(0, probes.shape[0], chunk):
            eps = probes[i : i + chunk]  # (m, B, d)
            tl = slopes[-1] * _push(first(eps), slopes[:-1], linears[:-1])
            ju = output_linear(tl, w_out)  # (m, B, d): J eps
            divs.append((ju * eps).sum((0, 2)))
            if frobenius:
                frobs.append(ju.pow(2).sum((0, 2)))
        scale = 1.0 / probes.shape[0]
    div = _total(divs, scale)
    return v, div, _total(frobs, scale) if frobs else torch.zeros_like(div)


def _total(parts: list[Tensor], scale: float) -> Tensor:
    """``scale * sum(parts)`` (one part: no extra operation when ``scale`` is 1)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total if scale == 1.0 else total * scale
