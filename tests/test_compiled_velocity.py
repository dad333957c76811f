"""``CompiledVelocity``: ``torch.compile`` of a velocity and of its one-pass Jacobian terms gives the
eager values and gradients (the ``compile`` training setting)."""

from __future__ import annotations

import pytest
import torch

from iterflow.core.flow import Block, Flow
from iterflow.core.nn import MLPVelocity
from iterflow.core.nn.compiled import CompiledVelocity


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_compiled_terms_and_gradients_equal_eager(activation: str) -> None:
    """(SiLU is traced through one shared sigmoid: ``mlp_jacobian.activation_and_slope``.)"""
    torch.manual_seed(0)
    net = MLPVelocity(3, hidden=(16, 16), activation=activation, time_freqs=2)
    fast = CompiledVelocity(net)
    assert list(fast.parameters()) == list(net.parameters())  # shared: the stage is what is saved
    x = torch.randn(64, 3)
    for t in (0.3, torch.tensor(0.7)):  # a float is passed as a tensor (no recompile per value)
        want = net.velocity_and_jacobian_terms(x, t, frobenius=True)
        got = fast.velocity_and_jacobian_terms(x, t, frobenius=True)
        assert want is not None and got is not None
        for a, b in zip(want, got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast(x, torch.tensor(0.5)), net(x, torch.tensor(0.5)))
    grads = []
    for f in (net.velocity_and_jacobian_terms, fast.velocity_and_jacobian_terms):
        net.zero_grad()
        v, div, frob = f(x, torch.tensor(0.4), frobenius=True)  # type: ignore[misc]
        (v.pow(2).sum() + div.sum() + frob.sum()).backward()
        grads.append([p.grad.clone() for p in net.parameters()])  # type: ignore[union-attr]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_velocity_without_one_pass_terms_keeps_the_autograd_path() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * t

    fast = CompiledVelocity(Plain())
    assert fast.velocity_and_jacobian_terms is None  # the integrand's capability check says no


@pytest.mark.parametrize("dim", [2, 5])
def test_compiled_flow_gives_the_eager_log_density_and_shares_the_weights(dim: int) -> None:
    """``Flow.compiled()``: the exact-trace log density through dopri5 equals the eager flow's
    (float64) for a two-block chain with a normalisation, and the view trains the same weights."""
    torch.manual_seed(dim)
    nets = [MLPVelocity(dim, hidden=(16, 16), time_freqs=1) for _ in range(2)]
    flow = Flow(
        [Block(n) for n in nets], (dim,), shift=torch.randn(dim), scale=torch.rand(dim) + 0.5
    ).double()
    fast = flow.compiled()
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in flow.parameters()]
    x = torch.randn(32, dim, dtype=torch.float64)
    with torch.no_grad():
        want = flow.log_prob(x, divergence="exact", atol=1e-8, rtol=1e-8)
        with fast.count_nfe() as c:
            got = fast.log_prob(x, divergence="exact", atol=1e-8, rtol=1e-8)
        assert c.nfe > 0  # the view's blocks count their own evaluations
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        nets[0].body[-1].bias.add_(0.1)  # a change of the shared weights reaches the view
        moved = flow.log_prob(x, divergence="exact", atol=1e-8, rtol=1e-8)
        assert (moved - want).abs().max() > 1e-3
        torch.testing.assert_close(
            fast.log_prob(x, divergence="exact", atol=1e-8, rtol=1e-8), moved, rtol=0, atol=1e-9
        )


@pytest.mark.parametrize("dim", [1, 3, 6])
def test_shared_sigmoid_silu_gives_silu_and_its_derivative(dim: int) -> None:
    """Traced by ``torch.compile``, SiLU and its slope come from one sigmoid; they equal the
    eager activation and the derivative autograd finds (float64, random pre-activations)."""
    from iterflow.core.nn.mlp_jacobian import _silu, activation_and_slope
    from iterflow.core.nn.precision import compiling

    assert not compiling()  # the traced branch is taken under torch.compile only
    assert (
        float(torch.compile(lambda z: z + float(compiling()), fullgraph=True)(torch.zeros(()))) == 1
    )

    torch.manual_seed(dim)
    h = 4 * torch.randn(64, dim, dtype=torch.float64, requires_grad=True)
    act = torch.nn.SiLU()
    traced = torch.compile(lambda z: activation_and_slope(act, _silu, z), fullgraph=True)
    a, s = traced(h)
    want = torch.nn.functional.silu(h)
    (grad,) = torch.autograd.grad(want.sum(), h, create_graph=True)
    torch.testing.assert_close(a, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, grad, rtol=1e-12, atol=1e-12)
    # differentiable: d(slope)/dh is SiLU's second derivative
    (second,) = torch.autograd.grad(s.sum(), h)
    (want2,) = torch.autograd.grad(grad.sum(), h)
    torch.testing.assert_close(second, want2, rtol=1e-10, atol=1e-12)
    eager_a, eager_s = activation_and_slope(act, _silu, h.detach())  # eager: the module's kernels
    torch.testing.assert_close(eager_a, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eager_s, grad.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("m", "h"), [(1, 16), (3, 40), (8, 7)])
def test_trace_contraction_eager_and_traced_equal_the_einsum(m: int, h: int) -> None:
    """The divergence's last contraction ``sum_{m,h} t[m,b,h] w[m,h]``: the eager batched product
    and the traced product-and-sum (``precision.trace_contraction``) equal the einsum (float64);
    in evaluation under bf16 autocast the contraction is float32, of the tangents as given."""
    from iterflow.core.nn.precision import trace_contraction

    g = torch.Generator().manual_seed(m * h)
    t = torch.randn(m, 33, h, generator=g, dtype=torch.float64)
    w = torch.randn(m, h, generator=g, dtype=torch.float64)
    want = torch.einsum("mbh,mh->b", t, w)
    torch.testing.assert_close(trace_contraction(t, w), want, rtol=1e-12, atol=1e-12)
    traced = torch.compile(trace_contraction, fullgraph=True)
    torch.testing.assert_close(traced(t, w), want, rtol=1e-12, atol=1e-12)
    t16, w32 = t.to(torch.bfloat16), w.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = trace_contraction(t16, w32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, torch.einsum("mbh,mh->b", t16.float(), w32), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_unfused_bias_under_autocast_keeps_a_float32_preactivation(dim: int) -> None:
    """``hidden_product``: the unfused form is the fused layer's value (float64, to rounding)
    and, under bf16 autocast, the bf16 product plus the float32 bias (a float32 pre-activation,
    within bf16's rounding of the exact one as the fused layer's); the compiled exact trace
    takes it in at most ``UNFUSED_BIAS_MAX_DIM`` dimensions under autocast only, and its terms
    stay within bf16's error of the eager float32 terms."""
    from iterflow.core.nn import mlp_jacobian as mj

    torch.manual_seed(dim)
    lin = torch.nn.Linear(32, 24).double()
    a = torch.randn(50, 32, dtype=torch.float64)
    torch.testing.assert_close(mj.hidden_product(a, lin, True), lin(a), rtol=1e-14, atol=1e-14)
    lin32, a32 = lin.float(), a.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, unfused = mj.hidden_product(a32, lin32), mj.hidden_product(a32, lin32, True)
    assert fused.dtype == torch.bfloat16 and unfused.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = torch.nn.functional.linear(a32, lin32.weight)  # bf16
    assert torch.equal(unfused, product.float() + lin32.bias)  # the bf16 product, then the bias
    exact = torch.nn.functional.linear(
        a32.bfloat16().double(), lin32.weight.bfloat16().double(), lin32.bias.double()
    )
    scale = exact.abs().max()
    for value in (fused, unfused):  # both within bf16's rounding of the exact pre-activation
        assert (value.double() - exact).abs().max() < 2.0**-7 * scale

    calls: list[bool] = []
    real = mj.hidden_product

    def spy(a: torch.Tensor, lin: torch.nn.Linear, unfused: bool = False) -> torch.Tensor:
        calls.append(unfused)
        return real(a, lin, unfused)

    net = MLPVelocity(dim, hidden=(32, 32, 32))
    x = torch.randn(40, dim)
    want = net.velocity_and_jacobian_terms(x, torch.tensor(0.3))
    mj.hidden_product = spy  # type: ignore[assignment]
    try:
        for amp in (False, True):
            torch._dynamo.reset()
            calls.clear()
            fast = CompiledVelocity(net)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                got = fast.velocity_and_jacobian_terms(x, torch.tensor(0.3))
            assert calls and set(calls) == {amp and dim <= mj.UNFUSED_BIAS_MAX_DIM}
            assert want is not None and got is not None
            for w, g in zip(want, got):
                tol = 5e-2 if amp else 1e-5
                torch.testing.assert_close(g.float(), w.detach(), rtol=tol, atol=tol)
    finally:
        mj.hidden_product = real  # type: ignore[assignment]
        torch._dynamo.reset()
