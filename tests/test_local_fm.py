"""Local flow matching (arXiv 2410.02548) against closed forms.

An Ornstein-Uhlenbeck step of Gaussian data is Gaussian:
``N(m, S) -> N(e^{-h} m, e^{-2h} S + (1 - e^{-2h}) I)``, so a block trained on Gaussian particles
must push them to that law; a chain must approach ``N(0, I)``. Runs in float64 with small networks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from iterflow.cli import main
from iterflow.errors import InputError
from iterflow.methods import METHODS, parse_options
from iterflow.methods.local_fm import LocalFlowMatching, LocalFMOptions, ou_step
from iterflow.train import TrainConfig, load_run, train

DT = torch.float64
MEAN = torch.tensor([1.2, -0.8], dtype=DT)
COV = torch.tensor([[0.5, 0.15], [0.15, 0.25]], dtype=DT)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def _ou_moments(m: torch.Tensor, s: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Law of the OU process after time ``t`` started from ``N(m, s)``."""
    eye = torch.eye(len(m), dtype=m.dtype)
    return math.exp(-t) * m, math.exp(-2 * t) * s + (1 - math.exp(-2 * t)) * eye


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks: a second thread only adds synchronisation (slow on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gaussian_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24,000 draws of N(MEAN, COV) saved as .npy (a finite data set for the trainer)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(24_000, 2, generator=g, dtype=DT)
    x = MEAN + z @ torch.linalg.cholesky(COV).T
    path = tmp_path_factory.mktemp("gauss") / "gauss.npy"
    np.save(path, x.numpy())
    return str(path)


def _config(data: str, **kw: object) -> TrainConfig:
    base = dict(
        method="local-fm",
        data=data,
        blocks=1,
        steps=400,
        batch_size=2048,
        lr=1e-2,
        hidden=(32, 32),
        ema=0.99,
        n_train=20_000,
        n_val=3000,
        n_test=500,
        time_freqs=0,
        standardize="none",
        dtype="float64",
        seed=0,
        checkpoint_every=1000,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _pushed(flow: torch.nn.Module, x: torch.Tensor, upto: int) -> torch.Tensor:
    with torch.no_grad():
        return flow.encode_by_block(x.to(DT), solver="rk4", steps=8)[upto]


# --------------------------------------------------------------------------- closed forms ----


def test_ou_step_moments_match_closed_form() -> None:
    g = torch.Generator().manual_seed(1)
    n, h = 200_000, 0.3
    x = MEAN + torch.randn(n, 2, generator=g, dtype=DT) @ torch.linalg.cholesky(COV).T
    y = ou_step(x, h, torch.randn(n, 2, generator=g, dtype=DT))
    m, s = _ou_moments(*_moments(x), h)
    got_m, got_s = _moments(y)
    torch.testing.assert_close(got_m, m, atol=5e-3, rtol=0)
    torch.testing.assert_close(got_s, s, atol=5e-3, rtol=0)


def test_schedule_constant_geometric_capped_and_explicit() -> None:
    geo = LocalFMOptions(h=0.1, h_growth=2.0, h_max=0.5)
    assert [geo.step(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert [LocalFMOptions(h=0.3, h_growth=1.0).step(n) for n in range(3)] == pytest.approx(
        [0.3] * 3
    )
    opts = parse_options(LocalFlowMatching, {"hs": "0.05,0.2", "final_block": "true"})
    method = LocalFlowMatching(opts, event_shape=(2,), num_blocks=3)  # type: ignore[arg-type]
    assert [method.step_size(n) for n in range(3)] == pytest.approx([0.05, 0.2, None])
    assert method.ou_time(2) == pytest.approx(0.25)
    assert METHODS.get("local-fm") is LocalFlowMatching


@pytest.mark.parametrize(
    ("raw", "argument"),
    [
        ({"h": "-1"}, "h"),
        ({"interpolant": "cubic"}, "interpolant"),
        ({"hs": "0.1,0"}, "hs"),
        ({"final_coupling": "nearest"}, "final_coupling"),
        ({"time_sampling": "beta"}, "time_sampling"),
        ({"time_sampling": "power", "time_mix": "1.5"}, "time_mix"),
        ({"time_weighting": "snr"}, "time_weighting"),
        ({"time_sampling": "logit-normal", "time_weighting": "importance"}, "time_weighting"),
    ],
)
def test_bad_options_name_the_option(raw: dict[str, str], argument: str) -> None:
    with pytest.raises(InputError) as err:
        parse_options(LocalFlowMatching, raw)
    assert err.value.argument == f"option {argument!r}"  # the CLI shows -o {argument}


def test_explicit_schedule_must_cover_every_ou_block() -> None:
    opts = LocalFMOptions(hs=(0.1, 0.2), final_block=True)
    LocalFlowMatching(opts, event_shape=(2,), num_blocks=3)  # two OU blocks + the final one
    with pytest.raises(InputError, match="hs"):
        LocalFlowMatching(opts, event_shape=(2,), num_blocks=4)


def test_targets_are_one_ou_step_with_fresh_noise() -> None:
    h = 0.4
    method = LocalFlowMatching(
        LocalFMOptions(h=h, final_block=True), event_shape=(2,), num_blocks=2
    )
    x = MEAN + torch.randn(1000, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    g = torch.Generator().manual_seed(3)
    a, b, last = method.targets(x, 0, g), method.targets(x, 0, g), method.targets(x, 1, g)
    noise = torch.randn(3, 1000, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    torch.testing.assert_close(a, math.exp(-h) * x + math.sqrt(1 - math.exp(-2 * h)) * noise[0])
    torch.testing.assert_close(b, math.exp(-h) * x + math.sqrt(1 - math.exp(-2 * h)) * noise[1])
    torch.testing.assert_close(last, noise[2])  # the final block's right ends: N(0, I)


# ------------------------------------------------------------------------ trained blocks ----


@pytest.mark.parametrize(
    ("interpolant", "times"),
    [
        ("straight", {}),
        ("trig", {}),
        # a time density leaning to the data end keeps the block's minimiser (the same OU step)
        ("straight", {"time_sampling": "power", "time_power": 3.0, "time_mix": 0.2}),
        # ... and so does importance weighting (the expected loss is the uniform-time one)
        ("straight", {"time_sampling": "power", "time_power": 2.0, "time_weighting": "importance"}),
    ],
)
def test_block_pushes_gaussian_to_its_ou_step(
    gaussian_file: str, tmp_path: Path, interpolant: str, times: dict[str, object]
) -> None:
    h = 0.5  # a block that took a step 20% shorter or longer fails the tolerances
    options = {"h": h, "interpolant": interpolant, "final_block": False, **times}
    cfg = _config(gaussian_file, options=options)
    res = train(cfg, tmp_path / "run")
    val = res.splits.val
    want_m, want_s = _ou_moments(*_moments(val.to(DT)), h)
    got_m, got_s = _moments(_pushed(res.flow, val, 1))
    torch.testing.assert_close(got_m, want_m, atol=0.05, rtol=0)
    torch.testing.assert_close(got_s, want_s, atol=0.05, rtol=0)
    rec = res.history[0]
    assert rec["h"] == h and rec["ou_time"] == h
    assert rec["mmd_to_normal"] < rec["data_mmd_to_normal"]
    assert rec["kl_to_normal"] < rec["data_kl_to_normal"]


def test_chain_on_gaussian_data_ends_near_standard_normal(
    gaussian_file: str, tmp_path: Path
) -> None:
    hs = (0.3, 0.6, 1.2)
    cfg = _config(
        gaussian_file, blocks=4, options={"hs": ",".join(map(str, hs)), "final_block": True}
    )
    res = train(cfg, tmp_path / "run")
    val = res.splits.val.to(DT)
    # After the OU blocks: the OU law at time sum(hs); after the final block: N(0, I). The three
    # blocks' errors add up, hence a looser tolerance than for one block (a chain missing its last
    # OU block would be off by ~0.3 in the mean).
    want_m, want_s = _ou_moments(*_moments(val), sum(hs))
    got_m, got_s = _moments(_pushed(res.flow, val, 3))
    torch.testing.assert_close(got_m, want_m, atol=0.07, rtol=0)
    torch.testing.assert_close(got_s, want_s, atol=0.05, rtol=0)
    end_m, end_s = _moments(_pushed(res.flow, val, 4))
    torch.testing.assert_close(end_m, torch.zeros(2, dtype=DT), atol=0.06, rtol=0)
    torch.testing.assert_close(end_s, torch.eye(2, dtype=DT), atol=0.06, rtol=0)
    kl = [res.history[0]["data_gaussian_kl_to_normal"]] + [
        r["gaussian_kl_to_normal"] for r in res.history
    ]
    assert all(a > b for a, b in zip(kl[:3], kl[1:4])), kl  # the OU blocks shrink it
    assert kl[-1] < 0.01 < kl[0] / 10, kl
    assert [r["h"] for r in res.history[:3]] == list(hs) and "h" not in res.history[3]


def test_resume_after_interruption_gives_the_same_chain(gaussian_file: str, tmp_path: Path) -> None:
    cfg = _config(
        gaussian_file,
        blocks=2,
        steps=40,
        batch_size=256,
        checkpoint_every=15,
        hidden=(16,),
        n_train=1000,
        n_val=300,
        options={"h": 0.5, "h_growth": 1.0, "final_block": False, "push_steps": 4},
    )
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(
            cfg, tmp_path / "cut", stop_after_steps=40 + 20
        )  # stage 1, after its step-15 checkpoint
    assert (tmp_path / "cut" / "progress.json").exists()
    resumed = train(cfg, tmp_path / "cut")
    for a, b in zip(whole.flow.state_dict().values(), resumed.flow.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    keys = ("local_mmd", "mmd_to_normal", "kl_to_normal", "movement")
    for a, b in zip(whole.history, resumed.history):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], abs=1e-10)
    flow, _, meta = load_run(tmp_path / "cut")
    assert flow.num_blocks == 2 and meta["stages_done"] == 2


# -------------------------------------------------------------------------------- the CLI ----


def test_cli_train_eval_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--method",
        "local-fm",
        "--data",
        "8gaussians",
        "--blocks",
        "3",
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--hidden",
        "16,16",
        "-o",
        "h=0.3",
        "-o",
        "h_growth=2",
        "-o",
        "final_block=true",
        "-o",
        "push_steps=4",
        "--n-train",
        "1000",
        "--n-val",
        "300",
        "--n-test",
        "300",
        "--checkpoint-every",
        "10",
        "--no-report",
        "--quiet",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    assert main(args) == 0  # same command on a finished run: resumes, nothing to do
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(run),
                "--json",
                "--n",
                "200",
                "--solver",
                "rk4",
                "--steps",
                "4",
                "--divergence",
                "hutchinson",
                "--probes",
                "2",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "local-fm" and out["blocks"] == 3 and math.isfinite(out["nll"])
    assert out["nfe_nll"] == 3 * 4 * 4  # blocks x steps x rk4 stages
    per_block = out["per_block"]
    assert len(per_block) == 3 and all(
        "mmd_to_normal" in r and "kl_to_normal" in r for r in per_block
    )
    assert [r["h"] for r in per_block[:2]] == pytest.approx([0.3, 0.6])
    assert main(["plot", str(run), "--n", "300"]) == 0
    shown = capsys.readouterr().out
    for name in ("samples.png", "blocks.png", "training.png"):
        assert name in shown and (run / "plots" / name).stat().st_size > 0


def test_cli_bad_option_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "train",
            "--method",
            "local-fm",
            "-o",
            "h_growth=0",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert code == 2 and "h_growth" in capsys.readouterr().err
