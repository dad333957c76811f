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


@pytest.mark.parametrize(("dim", "time_freqs"), [(1, 0), (2, 0), (3, 16), (6, 4)])
@pytest.mark.parametrize("autocast", [False, True])
def test_first_layer_weight_gradient_is_the_few_column_product(
    dim: int, time_freqs: int, autocast: bool
) -> None:
    """The first layer's value and gradients equal the plain ``W_0 x + W_t tf + b`` in float64,
    and its weight gradient is formed as ``[x, tf]^T g`` (a ``(k, B) x (B, H)`` product), never as
    an ``(H, B) x (B, k)`` one (the slow shape for few columns ``k``), with and without autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(10 * dim + time_freqs)
    hidden, batch = 48, 40
    net = MLPVelocity(dim, (hidden, hidden), time_freqs=time_freqs).double()
    x, t = torch.randn(batch, dim, dtype=torch.float64), torch.rand(batch, dtype=torch.float64)
    params = [net.inp.weight, net.inp_t.weight, net.inp.bias]
    tf = net.time(t[:, None]) if net.time is not None else t[:, None]
    ref = x @ net.inp.weight.T + tf @ net.inp_t.weight.T + net.inp.bias
    g = torch.randn(batch, hidden, dtype=torch.float64)
    grads_ref = torch.autograd.grad(ref, params, g)
    shapes: list[tuple[tuple[int, ...], ...]] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        h = net.first_layer(x, t)
    with Spy():
        grads = torch.autograd.grad(h, params, g)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    k = dim + tf.shape[1] + int(autocast)  # autocast folds the bias in as a column of ones
    assert ((k, batch), (batch, hidden)) in shapes, shapes
    assert not any(s[-2:] == ((hidden, batch), (batch, k)) for s in shapes), shapes
