"""Rectified-flow toolkit: closed-form velocity, straightness, reflow, distillation, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import iterflow.core.rectified as rectified
from iterflow import cli
from iterflow.cli import reflow as rectified_commands
from iterflow.core.flow import Block, Flow
from iterflow.core.rectified import (
    ClosedFormVelocity,
    Pairs,
    closed_form_flow,
    decode_model_units,
    save_pairs,
    straightness,
)
from iterflow.errors import InputError
from iterflow.evaluation.evaluate import EVAL_EXTRAS
from iterflow.evaluation.quality import memorization
from iterflow.methods.distill import euler_decode
from iterflow.methods.reflow import Reflow, ReflowOptions
from iterflow.train import TrainConfig, load_run, train

if "reflow" not in [
    c.name for c in cli.app.registered_commands
]:  # until cli.py registers commands/
    rectified_commands.register(cli.app)

TINY = [
    "--batch-size",
    "128",
    "--hidden",
    "32,32",
    "--n-train",
    "2000",
    "--n-val",
    "200",
    "--n-test",
    "300",
    "--quiet",
]


# ------------------------------------------------------------------------------------------------
# Closed-form velocity
# ------------------------------------------------------------------------------------------------


def brute_force_velocity(points: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Papers' formula with noise at t = 0, as an explicit float64 sum, converted to dx/ds = -dx/dt.

    v(x, t) = sum_i w_i (x_i - x) / (1 - t), w_i ∝ N((x - t x_i) / (1 - t); 0, I), t = 1 - s.
    """
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        t = 1.0 - float(s[b])
        dens = [math.exp(-0.5 * float(((x[b] - t * p) / (1 - t)).pow(2).sum())) for p in points]
        total = sum(dens)
        v_t = sum(d * (p - x[b]) / (1 - t) for d, p in zip(dens, points, strict=True)) / total
        out[b] = -v_t
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_closed_form_velocity_matches_brute_force(
    chunked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunked:  # force the streaming log-sum-exp over several chunks of data points
        monkeypatch.setattr(rectified, "_BLOCK_ENTRIES", 6)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(7, 3, generator=g, dtype=torch.float64)
    x = 1.5 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    s = torch.tensor([0.95, 0.7, 0.5, 0.3, 0.15, 0.4], dtype=torch.float64)
    v = ClosedFormVelocity(points, s_min=0.1)
    torch.testing.assert_close(
        v.exact(x, s), brute_force_velocity(points, x, s), rtol=1e-10, atol=1e-10
    )
    # one time for the whole batch (as inside an ODE solver)
    torch.testing.assert_close(
        v.exact(x, torch.tensor(0.3, dtype=torch.float64)),
        brute_force_velocity(points, x, torch.full((6,), 0.3, dtype=torch.float64)),
        rtol=1e-10,
        atol=1e-10,
    )
    # the module's field: v* on [s_min, 1] reparametrised to [0, 1]
    sigma = 0.1 + 0.9 * s
    torch.testing.assert_close(
        v(x, s), 0.9 * brute_force_velocity(points, x, sigma), rtol=1e-10, atol=1e-10
    )
    w = v.log_weights(x, s).exp()
    torch.testing.assert_close(w.sum(1), torch.ones(6, dtype=torch.float64))
    with pytest.raises(InputError, match="s"):
        v.exact(x, 0.0)


def test_closed_form_velocity_is_stable_where_the_naive_sum_underflows() -> None:
    points = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    x = torch.tensor([[4.99, 0.01], [-3.0, 1.0]], dtype=torch.float64)
    s = 1e-3  # exp(-|x - (1 - s) x_i|^2 / (2 s^2)) underflows to 0 for every i
    v = ClosedFormVelocity(points).exact(x, s)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(
        v[0], (x[0] - points[0]) / s
    )  # all weight on the nearest rescaled point
    torch.testing.assert_close(v[1], (x[1] - points[1]) / s)


def test_single_point_paths_are_straight_and_one_euler_step_is_exact() -> None:
    point = torch.tensor([[1.5, -2.0, 0.5]], dtype=torch.float64)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = closed_form_flow(point, s_min=0.0).double()  # v* itself; Euler never evaluates s = 0
    torch.testing.assert_close(
        exact.decode(z, solver="euler", steps=1), point.expand(64, 3), rtol=0, atol=1e-12
    )
    # reparametrised flow: stops at sigma = s_min, on the chord, for fixed-step solvers
    s_min = 1e-3
    flow = closed_form_flow(point, s_min=s_min).double()
    end = (1 - s_min) * point + s_min * z
    for solver, steps in (("euler", 1), ("rk4", 4)):
        torch.testing.assert_close(
            flow.decode(z, solver=solver, steps=steps), end, rtol=0, atol=1e-9
        )
    res = straightness(flow, z=z, solver="rk4", steps=16)
    assert res.straightness < 1e-12
    torch.testing.assert_close(res.transport_cost, float((z - end).pow(2).sum(1).mean()))
    traj = flow.trajectory(z[:5], solver="rk4", steps=8)  # (9, 5, 3) points on the chord
    frac = torch.linspace(1, 0, 9, dtype=torch.float64).reshape(9, 1, 1)
    torch.testing.assert_close(traj, frac * z[:5] + (1 - frac) * end[:5], rtol=0, atol=1e-9)


def test_closed_form_flow_memorises_training_points() -> None:
    g = torch.Generator().manual_seed(2)
    train_x = 3 * torch.randn(20, 2, generator=g, dtype=torch.float64)
    heldout = 3 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    flow = closed_form_flow(
        train_x, shift=torch.tensor([0.5, -0.5]), scale=torch.tensor([3.0, 3.0])
    ).double()
    m = memorization(flow, train_x, heldout, n=200, generator=g, solver="rk4", steps=32)
    assert (
        m.samples_median < 0.02 * m.heldout_median
    )  # within ~ s_min |z - x_i| of a training point
    assert m.heldout_median > 0.1


# ------------------------------------------------------------------------------------------------
# Straightness
# ------------------------------------------------------------------------------------------------


class ScalarLinear(nn.Module):
    """v(x, s) = a x: decoding from z gives x(s) = exp(-a (1 - s)) z."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        return self.a * x


@pytest.mark.parametrize("a", [0.5, -1.0])
def test_straightness_of_a_linear_flow_matches_closed_form(a: float) -> None:
    # chord c z with c = 1 - e^{-a}:
    # S = E|z|^2 int_0^1 (c - a e^{-a u})^2 du = E|z|^2 (a (1 - e^{-2a}) / 2 - c^2)
    d = 3
    flow = Flow([Block(ScalarLinear(a))], (d,)).double()
    z = torch.randn(4000, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    res = straightness(flow, z=z, solver="rk4", steps=64)
    c = 1 - math.exp(-a)
    ez2 = float(z.pow(2).sum(1).mean())  # E|z|^2 of this sample (d in expectation)
    assert res.straightness == pytest.approx(
        ez2 * (a * (1 - math.exp(-2 * a)) / 2 - c * c), rel=1e-3
    )
    assert res.transport_cost == pytest.approx(ez2 * c * c, rel=1e-7)
    assert res.nfe == 4 * 64 + 65


def test_straightness_is_positive_for_crossing_paths_and_registered_for_eval() -> None:
    points = torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
    res = straightness(
        closed_form_flow(points).double(),
        500,
        generator=torch.Generator().manual_seed(4),
        solver="rk4",
        steps=64,
    )
    assert res.straightness > 0.1 * res.transport_cost
    assert "straightness" in EVAL_EXTRAS
    with pytest.raises(InputError, match="solver"):
        straightness(closed_form_flow(points), 10, solver="dopri5")


# ------------------------------------------------------------------------------------------------
# Reflow and distillation
# ------------------------------------------------------------------------------------------------


def affine_pairs(n: int, seed: int) -> tuple[Pairs, torch.Tensor, torch.Tensor]:
    """Pairs (A z + b, z) with A symmetric positive definite: straight, non-crossing paths."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.tensor([[0.8, -0.6], [0.6, 0.8]])
    a = rot @ torch.diag(torch.tensor([2.0, 0.5])) @ rot.T
    b = torch.tensor([1.0, -0.5])
    z = torch.randn(n, 2, generator=g)
    return Pairs(data=z @ a.T + b, noise=z), a, b


def test_euler_decode_of_a_linear_field_matches_closed_form() -> None:
    # dx/ds = a x, k Euler steps from s = 1 down to s = 0: x_0 = (1 - a / k)^k z
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for k in (1, 3):
        x = euler_decode(Block(ScalarLinear(0.7)), z, k)
        torch.testing.assert_close(x, (1 - 0.7 / k) ** k * z)


def test_reflow_of_a_straight_coupling_stays_straight(tmp_path: Path) -> None:
    pairs, a, b = affine_pairs(4000, 5)
    save_pairs(tmp_path / "pairs.safetensors", pairs, {})
    cfg = TrainConfig(
        method="reflow",
        data="8gaussians",
        steps=400,
        batch_size=256,
        hidden=(64, 64),
        time_freqs=0,  # a smooth dependence on s: one Euler step evaluates only v(., 1)
        lr=3e-3,
        n_train=500,
        n_val=100,
        n_test=100,
        standardize="none",
        log_every=100,
        seed=1,
        options={"pairs": str(tmp_path / "pairs.safetensors"), "warm_start": False},
    )
    flow = train(cfg, tmp_path / "run").flow
    g = torch.Generator().manual_seed(6)
    res = straightness(flow, 512, generator=g)
    assert res.straightness < 0.01 * res.transport_cost  # the exact flow has S = 0
    z = torch.randn(512, 2, generator=g)
    one_step = flow.decode(z, solver="euler", steps=1)  # straight paths: one Euler step suffices
    err = (one_step - (z @ a.T + b)).pow(2).sum(1).mean()
    assert err < 0.01 * (z @ a.T + b - z).pow(2).sum(1).mean()
    # distillation on the same pairs, endpoint loss only: one Euler step reproduces the map too
    distill_cfg = dataclasses.replace(
        cfg, method="distill", options={**cfg.options, "k_steps": 1, "fm_weight": 0.0}
    )
    distilled = train(distill_cfg, tmp_path / "distilled").flow
    err = (distilled.decode(z, solver="euler", steps=1) - (z @ a.T + b)).pow(2).sum(1).mean()
    assert err < 0.01 * (z @ a.T + b - z).pow(2).sum(1).mean()


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rectified") / "fm"
    code = cli.main(
        [
            "train",
            "--method",
            "fm",
            "--data",
            "8gaussians",
            "--steps",
            "60",
            "--out",
            str(out),
            "--no-report",
            *TINY,
        ]
    )
    assert code == 0
    return out


def fresh_stage(source: Flow) -> Flow:
    cfg = {k: v for k, v in source.blocks[0].velocity.config().items() if k != "kind"}
    return Flow([Block(type(source.blocks[0].velocity)(**cfg))], source.event_shape)


def test_online_pairs_are_the_source_map_and_refresh_in_place(fm_run: Path, tmp_path: Path) -> None:
    source, _, _ = load_run(fm_run)
    file = str(tmp_path / "pairs.safetensors")
    opts = ReflowOptions(
        source=str(fm_run), pairs=file, n_pairs=64, pair_steps=4, regenerate_every=2
    )
    method = Reflow(opts, event_shape=(2,), num_blocks=1)
    stage = fresh_stage(source)
    data, noise = method.stage_data(stage, torch.zeros(10, 2), 0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        stage.blocks[0].velocity.state_dict(), source.blocks[0].velocity.state_dict()
    )
    spec = opts.pair_spec()
    with torch.no_grad():
        torch.testing.assert_close(data, decode_model_units(source, noise, spec))
    before = noise.clone()
    g = torch.Generator().manual_seed(1)
    method.loss(stage, (data[:8], noise[:8]), 0, g)
    assert torch.equal(noise, before)  # first call: no refresh yet
    method.loss(stage, (data[:8], noise[:8]), 0, g)
    assert not torch.equal(noise, before)  # second call: pool re-simulated in place
    with torch.no_grad():
        torch.testing.assert_close(data, decode_model_units(source, noise, spec))
    # the pairs file is reused as it is, and refused when it was made with other settings
    again = Reflow(opts, event_shape=(2,), num_blocks=1).stage_data(
        fresh_stage(source), torch.zeros(10, 2), 0, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(again[1], before)
    other = Reflow(
        ReflowOptions(source=str(fm_run), pairs=file, n_pairs=32), event_shape=(2,), num_blocks=1
    )
    with pytest.raises(InputError, match="pairs"):
        other.stage_data(
            fresh_stage(source), torch.zeros(10, 2), 0, torch.Generator().manual_seed(0)
        )


def test_cli_reflow_rounds_and_distill_then_eval(
    fm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rf = tmp_path / "rf"
    args = [
        "reflow",
        str(fm_run),
        "--out",
        str(rf),
        "--rounds",
        "2",
        "--steps",
        "30",
        "--n-pairs",
        "500",
        "--pair-steps",
        "4",
        "--no-report",
        "--quiet",
    ]
    assert cli.main(args) == 0
    for folder in (rf / "rounds" / "round_1", rf):
        assert (folder / "pairs.safetensors").exists() and (folder / "meta.json").exists()
    _, cfg, meta = load_run(rf)
    assert cfg.method == "reflow" and cfg.options["source"] == str(rf / "rounds" / "round_1")
    assert cfg.hidden == (32, 32) and cfg.data == "8gaussians"
    assert {"straightness", "transport_cost"} <= set(meta["history"][0])
    assert cli.main(args) == 0  # finished: re-running resumes and trains nothing
    assert load_run(rf)[2]["stages_done"] == 1

    dist = tmp_path / "distilled"
    assert (
        cli.main(
            [
                "distill",
                str(rf),
                "--out",
                str(dist),
                "--k-steps",
                "2",
                "--steps",
                "30",
                "--n-pairs",
                "500",
                "--pair-steps",
                "4",
                "--regenerate-every",
                "10",
                "--no-report",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["eval", str(dist), "--n", "200", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["method"] == "distill" and m["straightness"] >= 0 and m["transport_cost"] > 0
    assert m["per_block"][0]["k_steps"] == 2
    assert (
        cli.main(
            [
                "sample",
                str(dist),
                "--n",
                "20",
                "--out",
                str(tmp_path / "s.npy"),
                "--solver",
                "euler",
                "--steps",
                "2",
            ]
        )
        == 0
    )
    assert cli.main(["info", str(dist)]) == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--rounds", "0"], "--rounds"),
        (["-o", "n_pairs=0"], "n_pairs"),
        (["-o", "pair_solver=leapfrog"], "pair_solver"),
    ],
)
def test_cli_bad_input_exits_2(
    fm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], needle: str
) -> None:
    code = cli.main(
        [
            "reflow",
            str(fm_run),
            "--out",
            str(tmp_path / "x"),
            "--steps",
            "5",
            "--quiet",
            "--no-report",
            *args,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cli_refuses_same_folder_and_missing_source(
    fm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["distill", str(fm_run), "--out", str(fm_run), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    assert (
        cli.main(["distill", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    )
    assert "run" in capsys.readouterr().err
