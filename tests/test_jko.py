"""JKO-flow (iterflow.methods.jko) against the closed-form JKO step of Gaussian data, plus the
progressive trainer's guarantees (KL proxy falls, resume = uninterrupted) and the CLI.

Closed form. For ``p = N(m, s^2 I_d)`` and ``q = N(0, I_d)`` the JKO step
``argmin_rho KL(rho || q) + W2^2(p, rho) / (2 gamma)`` is reached by an affine map (the W2-optimal
map between Gaussians is affine, and the objective restricted to ``rho = N(mu, sigma^2 I)`` is
``(d sigma^2 + |mu|^2 - d - 2 d log sigma) / 2 + (|mu - m|^2 + d (sigma - s)^2) / (2 gamma)``).
Setting its derivatives to zero: ``mu = m / (1 + gamma)`` and
``(1 + gamma) sigma^2 - s sigma - gamma = 0``, i.e.
``sigma = (s + sqrt(s^2 + 4 gamma (1 + gamma))) / (2 (1 + gamma))``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from iterflow.cli import main
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import MLPVelocity
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError
from iterflow.methods import METHODS, parse_options
from iterflow.methods.jko import JKOOptions, jko_loss
from iterflow.train import RunDir, TrainConfig, train

DT = torch.float64


def jko_gaussian_step(m: Tensor, s: float, gamma: float) -> tuple[Tensor, float]:
    """Mean and standard deviation of the JKO step of ``N(m, s^2 I)`` toward ``N(0, I)``."""
    mu = m / (1 + gamma)
    sigma = (s + math.sqrt(s * s + 4 * gamma * (1 + gamma))) / (2 * (1 + gamma))
    return mu, sigma


def gaussian_objective(m: Tensor, s: float, mu: Tensor, sigma: float, gamma: float) -> float:
    """The JKO objective restricted to isotropic Gaussians, up to the constant of the data."""
    d = m.shape[0]
    kl = 0.5 * (d * sigma**2 + float(mu @ mu) - d - 2 * d * math.log(sigma))
    w2 = float((mu - m) @ (mu - m)) + d * (sigma - s) ** 2
    return kl + w2 / (2 * gamma)


def exact_moment_gaussian(n: int, m: Tensor, s: float, seed: int = 0) -> Tensor:
    """``n`` points whose mean is ``m`` and whose (1/n) covariance is ``s^2 I`` exactly."""
    z = torch.randn(n, m.shape[0], generator=torch.Generator().manual_seed(seed), dtype=DT)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / n)
    z = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return m + s * z


class AffineVelocity(nn.Module):
    """``v(x, s) = alpha x + c``: its flow is the affine map ``e^alpha x + c (e^alpha - 1) / alpha``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros((), dtype=DT))
        self.c = nn.Parameter(torch.zeros(d, dtype=DT))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        return self.alpha * x + self.c


M = torch.tensor([1.0, -0.5], dtype=DT)
S, GAMMA = 0.5, 0.5


def test_closed_form_is_the_minimiser() -> None:
    mu, sigma = jko_gaussian_step(M, S, GAMMA)
    best = gaussian_objective(M, S, mu, sigma, GAMMA)
    for dmu, dsig in [(0.01, 0.0), (-0.01, 0.0), (0.0, 0.01), (0.0, -0.01)]:
        assert gaussian_objective(M, S, mu + dmu, sigma + dsig, GAMMA) > best
    assert jko_gaussian_step(torch.zeros(2, dtype=DT), 1.0, 0.7)[1] == pytest.approx(1.0)


def test_jko_loss_of_an_affine_block_is_the_gaussian_objective() -> None:
    vel = AffineVelocity(2)
    with torch.no_grad():
        vel.alpha.fill_(0.3)
        vel.c.copy_(torch.tensor([0.2, -0.1], dtype=DT))
    stage = Flow([Block(vel)], (2,)).to(DT)
    x = exact_moment_gaussian(4096, M, S)
    loss = jko_loss(stage, x, GAMMA, SolverSpec("rk4", 32), None)
    a = math.exp(0.3)
    b = vel.c.detach() * (a - 1) / 0.3
    # E|a x + b|^2 / 2 - d log a, and E|(a - 1) x + b|^2, from the exact moments of x.
    kl = 0.5 * (float((a * M + b) @ (a * M + b)) + 2 * (a * S) ** 2) - 2 * 0.3
    w2 = float(((a - 1) * M + b) @ ((a - 1) * M + b)) + 2 * ((a - 1) * S) ** 2
    assert float(loss.terms["kl"].mean()) == pytest.approx(kl, abs=1e-9)
    assert float(loss.terms["w2"].mean()) == pytest.approx(w2, abs=1e-9)
    assert float(loss.value().detach()) == pytest.approx(kl + w2 / (2 * GAMMA), abs=1e-9)


def _fit(stage: Flow, x_fn, steps: int, lr: float, substeps: int) -> None:  # noqa: ANN001
    method = METHODS["jko"](
        parse_options(METHODS["jko"], {"gamma": GAMMA, "substeps": substeps}),
        event_shape=(2,),
        num_blocks=1,
    )
    opt = torch.optim.Adam(stage.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr / 50)
    gen = torch.Generator().manual_seed(3)
    for i in range(steps):
        loss = method.loss(stage, (x_fn(i),), 0, gen)
        opt.zero_grad()
        loss.value().backward()
        opt.step()
        sched.step()


def test_affine_block_reaches_the_closed_form_jko_step() -> None:
    """With exact first two moments the empirical objective over affine maps has the closed-form
    minimiser, so the optimiser must land on it to optimisation accuracy."""
    x = exact_moment_gaussian(2048, M, S)
    stage = Flow([Block(AffineVelocity(2))], (2,)).to(DT)
    _fit(stage, lambda i: x, steps=300, lr=0.05, substeps=2)
    mu, sigma = jko_gaussian_step(M, S, GAMMA)
    with torch.no_grad():
        z = stage.encode(x, solver="rk4", steps=32)
    torch.testing.assert_close(z.mean(0), mu, atol=1e-4, rtol=0)
    assert float(z.std(0, correction=0).mean()) == pytest.approx(sigma, abs=1e-4)


def test_small_network_block_lands_near_the_closed_form_jko_step() -> None:
    torch.manual_seed(0)
    stage = Flow([Block(MLPVelocity(2, hidden=(32, 32), activation="tanh"))], (2,)).to(DT)
    data_gen = torch.Generator().manual_seed(1)

    def batch(_: int) -> Tensor:
        return M + S * torch.randn(512, 2, generator=data_gen, dtype=DT)

    _fit(stage, batch, steps=300, lr=1e-2, substeps=2)
    mu, sigma = jko_gaussian_step(M, S, GAMMA)
    x = exact_moment_gaussian(8192, M, S, seed=5)
    with torch.no_grad():
        z = stage.encode(x, solver="rk4", steps=16)
    a = sigma / S  # the optimal map is x -> a x + (mu - a m)
    torch.testing.assert_close(z.mean(0), mu, atol=0.02, rtol=0)
    assert float(z.std(0, correction=0).mean()) == pytest.approx(sigma, abs=0.02)
    typical = (x - M).norm(dim=1) < 2 * S
    err = (z - (a * x + mu - a * M))[typical].norm(dim=1)
    assert float(err.mean()) < 0.03


def test_gamma_schedules() -> None:
    assert [JKOOptions(gamma=0.5).gamma_at(n) for n in range(3)] == [0.5, 0.5, 0.5]
    geo = JKOOptions(gamma=0.25, gamma_schedule="geometric", gamma_growth=2.0)
    assert [geo.gamma_at(n) for n in range(3)] == [0.25, 0.5, 1.0]
    capped = JKOOptions(gamma=0.25, gamma_schedule="geometric", gamma_growth=2.0, gamma_max=0.6)
    assert capped.gamma_at(2) == 0.6


def _gaussian_file(tmp_path: Path, n: int = 3000) -> str:
    x = M.numpy() + S * np.random.default_rng(0).standard_normal((n, 2))
    path = tmp_path / "gauss.npy"
    np.save(path, x.astype(np.float32))
    return str(path)


def _small_cfg(data: str, **kw: object) -> TrainConfig:
    base: dict = dict(
        method="jko",
        data=data,
        blocks=3,
        steps=80,
        batch_size=256,
        lr=1e-2,
        hidden=(16, 16),
        activation="tanh",
        n_train=2400,
        n_val=300,
        n_test=300,
        standardize=False,
        dtype="float64",
        ema=0.9,
        log_every=20,
        options={"gamma": 0.5, "substeps": 2, "push_steps": 8},
    )
    base.update(kw)
    return TrainConfig(**base)


def test_kl_proxy_falls_block_after_block_on_gaussian_data(tmp_path: Path) -> None:
    res = train(_small_cfg(_gaussian_file(tmp_path)), tmp_path / "run")
    val = res.splits.val.to(DT)
    proxies = [float(0.5 * val.pow(2).sum(1).mean())] + [r["kl_proxy"] for r in res.history]
    assert all(b < a for a, b in zip(proxies, proxies[1:])), proxies
    # kl_proxy_change of block n is kl_proxy_n - kl_proxy_{n-1} (E|x_0|^2/2 before the first), and
    # its standard error is that of the per-particle change, far below the proxy's own spread
    for n, r in enumerate(res.history):
        assert r["kl_proxy_change"] == pytest.approx(proxies[n + 1] - proxies[n], abs=1e-10)
        assert 0 < r["kl_proxy_change_se"] < float(0.5 * val.pow(2).sum(1).std()) / math.sqrt(300)
    assert all(r["movement"] > 0 and r["gamma"] == 0.5 for r in res.history)
    assert all("kl_to_normal" in r and math.isfinite(r["kl_to_normal"]) for r in res.history)
    # The exact JKO chain of this Gaussian lowers the KL by a known amount; the proxy's decrease is
    # the trained chain's KL decrease, so the two agree up to training and estimation error.
    mu, sigma = M.clone(), S
    kl = [_gaussian_kl(mu, sigma)]
    for _ in range(3):
        mu, sigma = jko_gaussian_step(mu, sigma, 0.5)
        kl.append(_gaussian_kl(mu, sigma))
    for n in range(1, 4):
        assert abs((proxies[0] - proxies[n]) - (kl[0] - kl[n])) < 0.15, (proxies, kl)


def _gaussian_kl(mu: Tensor, sigma: float) -> float:
    """``KL(N(mu, sigma^2 I_2) || N(0, I_2))``."""
    return 0.5 * (2 * sigma**2 + float(mu @ mu) - 2 - 4 * math.log(sigma))


def test_interrupted_run_resumes_to_the_same_chain(tmp_path: Path) -> None:
    cfg = _small_cfg(_gaussian_file(tmp_path), blocks=2, steps=20, checkpoint_every=5)
    ref = train(cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", stop_after_steps=27)  # stops inside block 2, after step 7
    assert RunDir(tmp_path / "b").progress_meta.exists()
    res = train(cfg, tmp_path / "b")
    for pa, pb in zip(ref.flow.state_dict().values(), res.flow.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    assert [r["kl_proxy"] for r in ref.history] == pytest.approx(
        [r["kl_proxy"] for r in res.history]
    )


def test_kill_9_then_the_same_command_resumes_to_the_same_chain(tmp_path: Path) -> None:
    """A real SIGKILL of `iterflow train --method jko` (not a simulated interrupt): re-running the
    command resumes from the last checkpoint and ends with the chain of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from iterflow.train import load_run

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "iterflow.cli", "train", "--method", "jko", "--out", str(out),
                *CLI_COMMON, "--blocks", "3", "--steps", "40", "--checkpoint-every", "5",
                "-o", "substeps=1", "--no-report"]  # fmt: skip

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    assert subprocess.run(command(ref), env=env, capture_output=True).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        command(cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (cut / "blocks" / "block_000.safetensors").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "no block checkpoint within 120 s"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed after its first block"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "blocks" / "block_002.safetensors").exists()
    assert subprocess.run(command(cut), env=env, capture_output=True).returncode == 0
    a, _, _ = load_run(ref)
    b, _, _ = load_run(cut)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("options", "record", "expected"),
    [
        ({}, {"stage": 3, "kl_proxy_change": 1.0, "kl_proxy_change_se": 0.1}, False),  # off
        (
            {"val_stop": True},
            {"stage": 3, "kl_proxy_change": 0.01, "kl_proxy_change_se": 0.1},
            True,
        ),
        (
            {"val_stop": True},
            {"stage": 3, "kl_proxy_change": -0.2, "kl_proxy_change_se": 0.1},
            False,
        ),
        (
            {"val_stop": True, "val_stop_z": 2},
            {"stage": 3, "kl_proxy_change": 0.15, "kl_proxy_change_se": 0.1},
            False,
        ),
        (
            {"val_stop": True, "val_stop_z": 2},
            {"stage": 3, "kl_proxy_change": 0.25, "kl_proxy_change_se": 0.1},
            True,
        ),
        (
            {"val_stop": True},
            {"stage": 3, "kl_proxy_change": math.nan, "kl_proxy_change_se": math.nan},
            True,
        ),
        (
            {"val_stop": True},
            {"stage": 0, "kl_proxy_change": 5.0, "kl_proxy_change_se": 0.1},
            False,
        ),
    ],
)
def test_val_stop_rule(options: dict, record: dict, expected: bool) -> None:
    cls = METHODS["jko"]
    method = cls(parse_options(cls, options), event_shape=(2,), num_blocks=5)
    assert method.reject_stage(record) is expected


def test_a_rejected_stage_is_dropped_and_ends_the_chain_also_after_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's side of ``reject_stage``: stage 2 (0-based) is trained, dropped, recorded as
    ``rejected``; the run keeps blocks 0 and 1, loads with them, and a second call trains nothing.
    An interrupted run resumed inside the rejected stage ends the same way."""
    from iterflow.apps.report import eval_run
    from iterflow.train import load_run

    monkeypatch.setattr(METHODS["jko"], "reject_stage", lambda self, record: record["stage"] == 2)
    cfg = _small_cfg(_gaussian_file(tmp_path), blocks=4, steps=20, checkpoint_every=5)
    res = train(cfg, tmp_path / "a")
    assert len(res.history) == 2 and res.flow.num_blocks == 2
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["stages_done"] == 2 and meta["rejected"]["stage"] == 2
    assert meta["train_seconds"] == pytest.approx(
        sum(r["seconds"] for r in meta["history"]) + meta["rejected"]["seconds"]
    )
    assert not RunDir(tmp_path / "a").progress_meta.exists()
    assert not (tmp_path / "a" / "blocks" / "block_002.safetensors").exists()
    again = train(cfg, tmp_path / "a")  # resumes a finished run: nothing to train
    assert len(again.history) == 2
    flow, _, _ = load_run(tmp_path / "a")
    assert flow.num_blocks == 2
    assert eval_run(tmp_path / "a", n=50)["rejected_stage"]["stage"] == 2
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", stop_after_steps=47)  # inside stage 2
    res_b = train(cfg, tmp_path / "b")
    for pa, pb in zip(res.flow.state_dict().values(), res_b.flow.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-9, rtol=0)
    meta_b = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta_b["rejected"]["kl_proxy"] == pytest.approx(meta["rejected"]["kl_proxy"])


def test_val_stop_drops_a_block_that_fits_the_training_particles(tmp_path: Path) -> None:
    """Data already N(0, I), 48 training rows, weak proximal term, no smoothing: the blocks can
    only fit the training particles, which raises the held-out proxy. With ``val_stop`` the chain
    ends at the first such block after the first, and every kept block after the first lowered
    the validation proxy."""
    x = np.random.default_rng(1).standard_normal((2048, 2))
    path = tmp_path / "normal.npy"
    np.save(path, x.astype(np.float32))
    cfg = _small_cfg(str(path), blocks=4, steps=150, n_train=48, n_val=1000, n_test=1000,
                     batch_size=48, hidden=(64, 64), ema=0.0,
                     options={"gamma": 5.0, "substeps": 2, "push_steps": 8, "val_stop": True})  # fmt: skip
    res = train(cfg, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    rejected = meta.get("rejected")
    assert rejected is not None and rejected["stage"] == len(res.history) < 4
    assert rejected["kl_proxy_change"] > 0
    assert all(r["kl_proxy_change"] <= 0 for r in res.history[1:])


def test_movement_tolerance_stops_the_chain(tmp_path: Path) -> None:
    cfg = _small_cfg(
        _gaussian_file(tmp_path), steps=10, options={"gamma": 0.5, "substeps": 1, "stop_tol": 1e6}
    )
    res = train(cfg, tmp_path / "run")
    assert len(res.history) == 1 and res.flow.num_blocks == 1


@pytest.mark.parametrize(
    "raw",
    [
        {"gamma": "0"},
        {"gamma_schedule": "linear"},
        {"gamma_growth": "-1"},
        {"solver": "dopri5"},
        {"substeps": "0"},
        {"divergence": "trace"},
        {"stop_tol": "-1"},
        {"val_stop_z": "-1"},
        {"val_stop": "maybe"},
        {"push_solver": "nope"},
        {"nonsense": "1"},
    ],
)
def test_bad_options_name_the_option(raw: dict) -> None:
    with pytest.raises(InputError) as err:
        parse_options(METHODS["jko"], raw)
    assert next(iter(raw)) in str(err.value)


CLI_COMMON = [
    "--data", "checkerboard", "--steps", "6", "--batch-size", "64", "--hidden", "8,8",
    "--n-train", "256", "--n-val", "64", "--n-test", "64", "--quiet",
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("jko", ["--blocks", "2", "-o", "substeps=1", "-o", "gamma_schedule=geometric"]),
        ("cnf", ["--blocks", "2", "-o", "steps=2", "-o", "kinetic=0.1", "-o", "jacobian=0.1"]),
    ],
)
def test_cli_train_eval_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str, extra: list[str]
) -> None:
    out = tmp_path / method
    args = ["train", "--method", method, "--out", str(out), *CLI_COMMON, *extra, "--no-report"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--n", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert math.isfinite(report["nll"]) and report["inversion_error"] >= 0
    assert report["method"] == method and report["blocks"] == 2
    # W2 by NFE: 1, 2, 4, 8, 16 Euler steps per block of the two blocks
    assert sorted(int(k) for k in report["w2_by_nfe"]) == [2, 4, 8, 16, 32]
    assert all("kl_proxy" in r and "movement" in r for r in report["per_block"])
    assert main(["plot", str(out), "--n", "200"]) == 0
    assert (out / "plots" / "samples.png").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--method", "jko", "-o", "gamma=-1"],
        ["--method", "jko", "-o", "gamma_schedule=cosine"],
        ["--method", "jko", "-o", "substeps=two"],
        ["--method", "cnf", "-o", "divergence=nope"],
        ["--method", "cnf", "-o", "solver=leapfrog"],
        ["--method", "cnf", "-o", "unknown=3"],
    ],
)
def test_cli_bad_options_exit_2(tmp_path: Path, args: list[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "r"), *CLI_COMMON, *args]) == 2
