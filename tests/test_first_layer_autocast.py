"""The MLP's first layer under autocast: one float32 product of ``[x, t features, 1]``."""

from __future__ import annotations

import pytest
import torch

from iterflow.core.nn import MLPVelocity


@pytest.mark.parametrize(("dim", "time_freqs", "x_freqs"), [(2, 0, 0), (3, 16, 0), (5, 4, 8)])
def test_first_layer_under_autocast_is_the_float32_one(dim: int, time_freqs: int, x_freqs: int):
    """With a time per row, the pre-activation under bf16 autocast equals the float32 one to
    float32 round-off (it is computed unrounded), for several widths, time and x features; its
    gradients reach the weights and the bias as without autocast."""
    torch.manual_seed(dim)
    net = MLPVelocity(dim, (32, 32), time_freqs=time_freqs, x_freqs=x_freqs)
    x, t = torch.randn(64, dim), torch.rand(64)
    ref = net.first_layer(x, t)
    grads_ref = torch.autograd.grad(ref.pow(2).sum(), [net.inp.weight, net.inp.bias])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = net.first_layer(x, t)
    # backward outside the context, as the trainer calls it
    grads = torch.autograd.grad(h.float().pow(2).sum(), [net.inp.weight, net.inp.bias])
    if x_freqs == 0:  # the Fourier features' own product stays under autocast (bf16)
        assert h.dtype == torch.float32
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
        for g, gr in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(h.float(), ref, rtol=0.02, atol=0.02)
    # one time for all rows (ODE solvers) keeps the broadcast path and its result
    torch.testing.assert_close(net.first_layer(x, torch.tensor(0.3)), net.first_layer(x, 0.3))
