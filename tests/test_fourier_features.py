"""Random Fourier features of ``x`` in the MLP velocity (``x_freqs``, ``x_scale``): the features and
their derivatives against autograd, saving and rebuilding, the configuration and the CLI flags.
The one-pass Jacobian terms of networks with these features are checked against the full Jacobian
in tests/test_fast_divergence.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.func import jvp

from iterflow.cli import main
from iterflow.core.nn import MLPVelocity, build_network
from iterflow.core.nn.mlp import FourierInput
from iterflow.errors import InputError
from iterflow.train import TrainConfig, load_run, network_config

DT = torch.float64


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_features_and_their_tangents(dim: int) -> None:
    torch.manual_seed(dim)
    f = FourierInput(dim, 6, scale=0.8).to(DT)
    x = torch.randn(7, dim, dtype=DT)
    ang = x @ f.freqs
    torch.testing.assert_close(f(x), torch.cat([ang.sin(), ang.cos()], 1))
    u = torch.randn(3, 7, dim, dtype=DT)  # (m, B, d) tangents
    got = f.tangent_map(x)(u)
    for k in range(3):
        _, want = jvp(f, (x,), (u[k],))
        torch.testing.assert_close(got[k], want, atol=1e-12, rtol=0)
    shared = f.tangent_map(x)(u[:, :1])  # one tangent per probe, shared by the rows
    for k in range(3):
        _, want = jvp(f, (x,), (u[k, :1].expand(7, dim),))
        torch.testing.assert_close(shared[k], want, atol=1e-12, rtol=0)


def test_frequencies_are_gaussian_with_the_asked_scale() -> None:
    torch.manual_seed(0)
    freqs = FourierInput(4, 2000, scale=1.7).freqs / (2 * math.pi)  # 8,000 draws
    assert abs(float(freqs.mean())) < 4 * 1.7 / math.sqrt(8000)
    assert abs(float(freqs.std()) / 1.7 - 1) < 0.05


def test_network_with_features_saves_and_rebuilds() -> None:
    torch.manual_seed(3)
    net = MLPVelocity(3, (16, 16), "relu", time_freqs=2, x_freqs=12, x_scale=0.5).to(DT)
    cfg = net.config()
    assert cfg["x_freqs"] == 12 and cfg["x_scale"] == 0.5
    torch.manual_seed(99)  # another draw: the saved buffer, not the seed, restores the features
    again = build_network(cfg).to(DT)
    assert not torch.equal(again.fourier.freqs, net.fourier.freqs)  # type: ignore[union-attr]
    again.load_state_dict(net.state_dict())
    x, t = torch.randn(9, 3, dtype=DT), torch.tensor(0.3, dtype=DT)
    torch.testing.assert_close(again(x, t), net(x, t), atol=0, rtol=0)
    # the features change the field: zeroing their weights gives another velocity
    with torch.no_grad():
        again.inp_f.weight.zero_()  # type: ignore[union-attr]
    assert not torch.allclose(again(x, t), net(x, t))


def test_without_features_nothing_changes() -> None:
    torch.manual_seed(5)
    plain = MLPVelocity(2, (8, 8))
    torch.manual_seed(5)
    with_f = MLPVelocity(2, (8, 8), x_freqs=4)
    assert "x_freqs" not in plain.config() and plain.fourier is None
    assert not any("fourier" in k or "inp_f" in k for k in plain.state_dict())
    # the features are drawn last: the other weights initialise as without them
    for k, v in plain.state_dict().items():
        assert torch.equal(with_f.state_dict()[k], v), k


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"x_freqs": -1}, "x_freqs"), ({"x_freqs": 1.5}, "x_freqs"), ({"x_scale": 0.0}, "x_scale")],
)
def test_bad_settings_name_their_argument(kwargs: dict, argument: str) -> None:
    with pytest.raises(InputError) as info:
        MLPVelocity(2, (8,), **kwargs)
    assert info.value.argument == argument
    with pytest.raises(InputError) as info:
        TrainConfig(**kwargs)
    assert info.value.argument == argument


def test_config_passes_them_to_the_mlp_only() -> None:
    cfg = TrainConfig(method="fm", hidden=(8,), x_freqs=16, x_scale=2.0)
    net_cfg = network_config(cfg, (2,))
    assert net_cfg["x_freqs"] == 16 and net_cfg["x_scale"] == 2.0
    assert "x_freqs" not in network_config(TrainConfig(method="fm"), (2,))
    # a config.json written before these fields existed reads as without features
    old = TrainConfig(method="fm").to_json()
    del old["x_freqs"], old["x_scale"]
    assert TrainConfig.from_json(old) == TrainConfig(method="fm")
    with pytest.raises(InputError) as info:
        network_config(TrainConfig(method="fm", network="unet", x_freqs=4), (1, 8, 8))
    assert info.value.argument == "x_freqs"


def test_cli_trains_and_resumes_with_features(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"

    def train(*features: str) -> int:
        return main(["train", "--method", "fm", "--data", "8gaussians", "--out", str(out),
                     "--steps", "20", "--batch-size", "64", "--hidden", "16,16", "--n-train",
                     "500", "--n-val", "50", "--n-test", "50", *features, "--no-report",
                     "--quiet"])  # fmt: skip

    assert train("--x-freqs", "8", "--x-scale", "0.5") == 0
    flow, _, _ = load_run(out)
    net = flow.chain[0].velocity
    assert net.fourier is not None and net.fourier.freqs.shape == (2, 8)
    assert train("--x-freqs", "8", "--x-scale", "0.5") == 0  # the same config: accepted again
    capsys.readouterr()
    assert train("--x-freqs", "4", "--x-scale", "0.5") == 2  # another config: refused
    assert "another config" in capsys.readouterr().err
    assert train("--x-freqs", "8", "--x-scale", "-1") == 2
    err = capsys.readouterr().err
    assert "--x-scale" in err and "Traceback" not in err


def test_phases_keep_their_precision_under_autocast() -> None:
    torch.manual_seed(0)
    f = FourierInput(2, 64, scale=1.5)
    x = 2 * torch.randn(256, 2)
    want = f(x.double()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = f(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # bfloat16 phases: ~0.1 off
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net = MLPVelocity(2, (16,), x_freqs=8)
        assert torch.isfinite(net(x, torch.tensor(0.5))).all()
