"""Mixed precision of the MLP velocity's thin layers: which products stay unrounded under autocast.

Under ``torch.autocast`` the matrix products of the hidden layers (``H x H``, the arithmetic) run in
its low-precision dtype. The products whose depth is the data's run in the weights' dtype: the input
layer's ``x`` and time terms and the tangents' first map always (:func:`unrounded_linear`); the
output layer and the divergence's last contraction when no gradient is recorded, i.e. in evaluation
(:func:`evaluation_unrounded`): there their rounding would be the largest error of a likelihood or a
sample. In training it is far below the minibatch's noise, so the training step keeps its products
(and its measured speed): ``benchmarks/compare_revisions.py`` (two threads, nine paired rounds) read
0.96x / 0.92x for the bf16 flow-matching step with the output product in float32 and 0.94x /
0.99x for the unchanged step (``results/revisions_unrounded_{output,eval}_t2.md``), so the cost is
within this machine's noise either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (PyTorch before 2.4 asks per device)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # pragma: no cover - torch < 2.4
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def unrounded_linear(a: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(a, weight, bias)`` in the weights' precision, also under autocast.

    For the layers of an MLP velocity whose depth is the data's (the input layer's ``x`` and time
    terms, the output layer, the tangents' first and last maps): under bfloat16 autocast their
    rounding would be the largest error of a likelihood (coordinates and velocities kept to three
    significant digits) while they cost a few columns. An exploratory check on the checkerboard
    model (not a scripted figure) found the per-point NLL error under bf16 about halved with them
    unrounded, at the same seconds per evaluation; ``benchmarks/bench_speed.py --like-parts
    work-precision`` measures the result against the plain evaluator.
    """
    if not autocast_on(a.device.type):
        return F.linear(a, weight, bias)
    with torch.autocast(a.device.type, enabled=False):
        return F.linear(a.to(weight.dtype), weight, bias)


def evaluation_unrounded(device_type: str) -> bool:
    """Whether the output products run unrounded here: under autocast without a gradient."""
    return autocast_on(device_type) and not torch.is_grad_enabled()


def output_linear(a: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """An MLP's output layer: :func:`unrounded_linear` in evaluation under autocast
    (:func:`evaluation_unrounded`), else ``F.linear`` (under autocast: rounded)."""
    if evaluation_unrounded(a.device.type):
        return unrounded_linear(a, weight, bias)
    return F.linear(a, weight, bias)


#: ``torch.compiler.is_compiling`` (PyTorch 2.3 on; ``torch._dynamo.is_compiling`` before),
#: looked up once: it is asked per layer and evaluation.
_IS_COMPILING = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing this call."""
    return bool(_IS_COMPILING())


def trace_contraction(t: Tensor, w: Tensor) -> Tensor:
    """``sum_{m, h} t[m, b, h] w[m, h]``: the divergence's last contraction, tangents ``t``
    ``(m, B, H)`` of the last hidden layer against the output layer's rows ``w`` ``(m, H)``; ``(B,)``.

    In ``w``'s precision where :func:`output_linear` is unrounded. Eagerly one batched matrix
    product (``t @ w[..., None]``: an ``einsum("mbh,mh->b")`` permutes ``t`` into a copy first);
    traced by ``torch.compile``, a product summed over the contiguous ``H`` axis, which Inductor
    fuses into the loop that makes ``t`` and vectorises, where it lowers the batched product of
    ``m > 1`` tangents to a scalar loop. An exploratory A/B (not a scripted figure; 500 points,
    two threads, interleaved): the compiled one-pass terms took 20-31 % less time under bf16 in
    10-64-D and 5-16 % less in float32; eagerly the batched product beat the einsum under bf16
    and tied in float32. ``benchmarks/bench_speed.py --like-parts work-precision`` measures the
    evaluator as a whole.
    """
    if evaluation_unrounded(t.device.type):
        with torch.autocast(t.device.type, enabled=False):
            return _contract(t.to(w.dtype), w)
    return _contract(t, w)


def _contract(t: Tensor, w: Tensor) -> Tensor:
    if compiling():
        return (t * w.unsqueeze(1)).sum(-1).sum(0)
    return torch.matmul(t, w.unsqueeze(-1)).squeeze(-1).sum(0)
