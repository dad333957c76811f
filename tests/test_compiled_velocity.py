"""``CompiledVelocity``: ``torch.compile`` of a velocity and of its one-pass Jacobian terms gives the
eager values and gradients (the ``compile`` training setting)."""

from __future__ import annotations

import torch

from iterflow.core.nn import MLPVelocity
from iterflow.core.nn.compiled import CompiledVelocity


def test_compiled_terms_and_gradients_equal_eager() -> None:
    torch.manual_seed(0)
    net = MLPVelocity(3, hidden=(16, 16), activation="gelu", time_freqs=2)
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
