"""Likelihoods under bf16 autocast: the MLP's thin layers unrounded, ``Flow.log_prob(autocast=)``
against float64 references and a closed form, its refusals, ``score_rows`` and ``iterflow score``."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iterflow.cli import main
from iterflow.core.flow import BF16_MIN_TOLERANCE, Block, Flow
from iterflow.core.nn import MLPVelocity
from iterflow.core.nn.mlp_jacobian import velocity_and_jacobian_terms
from iterflow.core.nn.precision import unrounded_linear
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError
from iterflow.evaluation.score import score_rows

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def mlp_flow(dim: int, seed: int, time_freqs: int = 4) -> Flow:
    """A flow of one random MLP velocity (weights large enough for a visibly curved map)."""
    torch.manual_seed(seed)
    net = MLPVelocity(dim, (48, 48), time_freqs=time_freqs)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    g = torch.Generator().manual_seed(seed)
    shift, scale = torch.randn(dim, generator=g), torch.rand(dim, generator=g) + 0.5
    return Flow([Block(net)], (dim,), shift=shift, scale=scale)


@pytest.mark.parametrize("shape", [(7, 3), (2, 5, 3), (1, 3)])
def test_unrounded_linear_is_the_float32_product_under_autocast(shape: tuple[int, ...]):
    g = torch.Generator().manual_seed(len(shape))
    a, w, b = torch.randn(shape, generator=g), torch.randn(4, 3, generator=g), torch.randn(4)
    ref = F.linear(a, w, b)
    with torch.autocast(**BF16):
        out, rounded = unrounded_linear(a, w, b), F.linear(a, w, b)
    assert out.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert (rounded.float() - ref).abs().max() > 1e-4  # autocast did round the plain product
    torch.testing.assert_close(unrounded_linear(a, w, b), ref, rtol=0, atol=0)


@pytest.mark.parametrize(("dim", "time_freqs", "x_freqs"), [(2, 0, 0), (3, 8, 0), (6, 2, 4)])
def test_mlp_under_autocast_keeps_its_end_layers_unrounded(dim: int, time_freqs: int, x_freqs: int):
    """One time for all rows (ODE solvers): the first layer equals the float32 one to round-off;
    in evaluation (no gradient) the velocity comes out in float32, within bf16's rounding of the
    hidden layers, and the one-pass terms give the same velocity as ``forward`` and a divergence
    near the float32 one; with a gradient (training) the output product stays bf16."""
    torch.manual_seed(dim)
    net = MLPVelocity(dim, (64, 64), time_freqs=time_freqs, x_freqs=x_freqs)
    x, t = torch.randn(128, dim), torch.tensor(0.4)
    with torch.no_grad():
        h_ref, v_ref = net.first_layer(x, t), net(x, t)
        _, div_ref, _ = velocity_and_jacobian_terms(net, x, t)
        with torch.autocast(**BF16):
            h, v = net.first_layer(x, t), net(x, t)
            v1, div, _ = velocity_and_jacobian_terms(net, x, t)
    with torch.autocast(**BF16):
        v_train, div_train, _ = velocity_and_jacobian_terms(net, x, t)
        assert net(x, t).dtype == v_train.dtype == torch.bfloat16
        assert net.first_layer(x, t).dtype == torch.float32
    if x_freqs == 0:  # the Fourier features' own product stays under autocast (bf16)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert v.dtype == v1.dtype == div.dtype == torch.float32
    torch.testing.assert_close(v1, v, rtol=1e-6, atol=1e-6)
    scale = float(v_ref.abs().max())
    assert 0 < float((v - v_ref).abs().max()) < 0.03 * scale
    assert float((v_train.detach().float() - v_ref).abs().max()) < 0.03 * scale
    assert div_train.requires_grad
    dscale = float(div_ref.abs().max())
    assert float((div - div_ref).abs().max()) < 0.05 * dscale


def test_hutchinson_and_frobenius_terms_under_autocast():
    torch.manual_seed(0)
    net = MLPVelocity(4, (64, 64), time_freqs=2)
    x, t = torch.randn(64, 4), torch.tensor(0.7)
    eps = torch.randn(3, 64, 4)
    with torch.no_grad():
        ref = velocity_and_jacobian_terms(net, x, t, eps, frobenius=True)
        ref_exact = velocity_and_jacobian_terms(net, x, t, frobenius=True)
    with torch.no_grad(), torch.autocast(**BF16):
        got = velocity_and_jacobian_terms(net, x, t, eps, frobenius=True)
        got_exact = velocity_and_jacobian_terms(net, x, t, frobenius=True)
    for a, b in [*zip(got, ref, strict=True), *zip(got_exact, ref_exact, strict=True)]:
        assert a.dtype == torch.float32
        assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


@pytest.mark.parametrize("dim", [2, 4, 7])
def test_bf16_log_prob_is_near_the_float64_reference(dim: int):
    """Random MLP flows in several dimensions against a float64 reference: at 1e-3 bf16's
    rounding stays below the solver's own error (mean error within 1.5x the float32 one at the
    same tolerance), at 1e-4 every point is within 0.02 nats (the rounding's floor is lower than
    1e-3's solver error), the mean within 1e-3; and the result is not the float32 one."""
    flow = mlp_flow(dim, seed=dim)
    x = flow.sample(200, generator=torch.Generator().manual_seed(1)).detach()

    def nll_error(tol: float, autocast: str) -> Tensor:
        spec = SolverSpec("dopri5", atol=tol, rtol=tol, error_norm="rows")
        with torch.no_grad():
            return flow.log_prob(x, divergence="exact", solver=spec, autocast=autocast) - ref

    with torch.no_grad():
        ref = copy.deepcopy(flow).double().log_prob(x.double(), solver="dopri5", atol=1e-9,
                                                    rtol=1e-9).float()  # fmt: skip
    e32, e16, e16_tight = nll_error(1e-3, "none"), nll_error(1e-3, "bf16"), nll_error(1e-4, "bf16")
    assert not torch.equal(e16, e32)
    assert float(e16.abs().mean()) <= 1.5 * float(e32.abs().mean())
    assert float(e16_tight.abs().max()) < 0.02
    assert float(e16_tight.abs().mean()) < 0.3 * float(e16.abs().mean())
    assert abs(float(e16_tight.mean())) < 1e-3


class LinearField(nn.Module):
    """``v(x, s) = A x``: the block maps ``u`` to ``expm(A) u``, log-determinant ``tr A``."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return x @ self.a.T


@pytest.mark.parametrize("dim", [2, 5])
def test_bf16_log_prob_of_a_linear_flow_matches_the_closed_form(dim: int):
    """``x = expm(-A) z``-type Gaussian: ``log p(x) = log N(expm(A) x) + tr A``; under bf16 the
    product ``A x`` is rounded (any network), the result stays within bf16's few 1e-3 relative."""
    g = torch.Generator().manual_seed(dim)
    a = 0.4 * torch.randn(dim, dim, generator=g)
    flow = Flow([Block(LinearField(a))], (dim,))
    x = torch.randn(300, dim, generator=g)
    z = x @ torch.linalg.matrix_exp(a).T
    exact = -0.5 * z.pow(2).sum(1) - 0.5 * dim * math.log(2 * math.pi) + torch.trace(a)
    with torch.no_grad():
        lp = flow.log_prob(x, divergence="exact", solver="rk4", steps=32, autocast="bf16")
    scale = float(exact.abs().max())
    assert float((lp - exact).abs().max()) < 0.02 * scale


def test_bf16_refusals_name_the_argument():
    flow = mlp_flow(3, seed=0)
    x = torch.randn(5, 3)
    with pytest.raises(InputError, match="autocast.*one of"):
        flow.log_prob(x, autocast="fp8")
    with pytest.raises(InputError, match="autocast.*atol and rtol >= 0.0001"):
        flow.log_prob(x, atol=1e-5, rtol=1e-3, autocast="bf16")
    with pytest.raises(InputError, match="autocast.*float32"):
        copy.deepcopy(flow).double().log_prob(x.double(), atol=1e-3, rtol=1e-3, autocast="bf16")
    # fixed steps have no tolerance to miss; the smallest adaptive tolerance is accepted
    with torch.no_grad():
        flow.log_prob(x, solver="rk4", steps=4, autocast="bf16")
        flow.log_prob(x, atol=BF16_MIN_TOLERANCE, rtol=BF16_MIN_TOLERANCE, autocast="bf16")


def test_score_rows_under_bf16_checks_first_and_matches_log_prob():
    flow = mlp_flow(2, seed=3)
    x = flow.sample(40, generator=torch.Generator().manual_seed(0)).detach()
    spec = SolverSpec("dopri5", atol=1e-3, rtol=1e-3, error_norm="rows")
    res = score_rows(flow, x, divergence="exact", solver=spec, chunk=40, autocast="bf16")
    with torch.no_grad():
        lp = flow.log_prob(x, divergence="exact", solver=spec, autocast="bf16")
    torch.testing.assert_close(res.values, lp.double(), rtol=0, atol=1e-6)
    bad = x.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(InputError, match="autocast"):  # the setting before the rows
        score_rows(flow, bad, divergence="exact", autocast="bf16")


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from iterflow.train import TrainConfig, train

    cfg = TrainConfig.for_method(
        "fm", data="8gaussians", steps=30, hidden=(16, 16), batch_size=64, n_train=300, n_val=30,
        n_test=30, checkpoint_every=10**6,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("bf16") / "run"
    train(cfg, folder)
    return folder


def test_cli_score_autocast(float32_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32))
    out = tmp_path / "s.npy"
    args = ["score", str(float32_run), "--data", str(data), "--atol", "1e-3", "--rtol", "1e-3"]
    assert main([*args, "-q", "--autocast", "bf16", "--out", str(out)]) == 0
    bf16 = np.load(out)
    assert main([*args, "-q", "--out", str(out)]) == 0
    assert bf16.shape == (6,) and np.isfinite(bf16).all()
    assert 0 < np.abs(bf16 - np.load(out)).max() < 0.1
    capsys.readouterr()
    assert main([*args, "-q", "--autocast", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--autocast" in err and "Traceback" not in err
    tight = ["score", str(float32_run), "--data", str(data), "--autocast", "bf16", "-q"]
    assert main(tight) == 2  # the default tolerances, 1e-5, are below bf16's floor
    assert "0.0001" in capsys.readouterr().err
