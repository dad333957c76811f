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


def output_einsum(spec: str, a: Tensor, w: Tensor) -> Tensor:
    """``einsum(spec, a, w)`` with an output layer's weights ``w`` (the divergence's last
    contraction), in ``w``'s precision where :func:`output_linear` is unrounded."""
    if not evaluation_unrounded(a.device.type):
        return torch.einsum(spec, a, w)
    with torch.autocast(a.device.type, enabled=False):
        return torch.einsum(spec, a.to(w.dtype), w)
