"""Trainer: determinism, resumption after an interruption, run-folder validation, couplings, paths."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from iterflow.core.couplings import assignment, couple
from iterflow.core.paths import get_interpolant
from iterflow.errors import InputError
from iterflow.train import TrainConfig, load_run, lr_at, standardization, train

TINY = dict(
    data="8gaussians",
    steps=60,
    batch_size=128,
    hidden=(32, 32),
    n_train=2000,
    n_val=200,
    n_test=200,
    checkpoint_every=20,
    log_every=10,
    dtype="float64",
)


def weights(flow: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in flow.parameters()]


def test_same_seed_same_model(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY)
    a = train(cfg, tmp_path / "a").flow
    b = train(cfg, tmp_path / "b").flow
    for p, q in zip(weights(a), weights(b)):
        assert torch.equal(p, q)
    c = train(TrainConfig(**{**TINY, "seed": 1}), tmp_path / "c").flow
    assert not all(torch.equal(p, q) for p, q in zip(weights(a), weights(c)))


def test_loss_decreases(tmp_path: Path) -> None:
    cfg = TrainConfig(**{**TINY, "steps": 200})
    train(cfg, tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("stop_after", [30, 45])
def test_resume_after_interruption_gives_the_same_model(tmp_path: Path, stop_after: int) -> None:
    cfg = TrainConfig(**TINY)
    ref = train(cfg, tmp_path / "ref").flow
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "int", stop_after_steps=stop_after)
    assert (tmp_path / "int" / "progress.safetensors").exists()
    resumed = train(cfg, tmp_path / "int").flow
    for p, q in zip(weights(ref), weights(resumed)):
        assert torch.allclose(p, q, atol=1e-10)
    assert not (tmp_path / "int" / "progress.safetensors").exists()
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "int" / "log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated log lines

    # the stage record's means count the steps logged before the interruption too
    def means(run: Path) -> dict[str, float]:
        (record,) = load_run(run)[2]["history"]
        return {k: v for k, v in record.items() if k.startswith(("mean_", "final_"))}

    assert means(tmp_path / "int") == pytest.approx(means(tmp_path / "ref"), rel=1e-9, abs=1e-12)


def test_run_folder_rules(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY)
    train(cfg, tmp_path / "r")
    with pytest.raises(InputError, match="another config"):
        train(TrainConfig(**{**TINY, "lr": 1e-4}), tmp_path / "r")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(InputError, match="--out"):
        train(cfg, tmp_path / "junk")
    flow, cfg2, meta = load_run(tmp_path / "r")
    assert cfg2 == cfg and meta["stages_done"] == 1


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY)
    train(cfg, tmp_path / "r")
    block = tmp_path / "r" / "blocks" / "block_000.safetensors"
    good = block.read_bytes()
    block.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="safetensors"):
        load_run(tmp_path / "r")
    block.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_run(tmp_path / "r")
    block.write_bytes(good)
    meta_path = tmp_path / "r" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["networks"][0]["hidden"] = [16, 16]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="must match the network"):
        load_run(tmp_path / "r")
    meta_path.write_text("{not json")
    with pytest.raises(InputError, match="valid JSON"):
        load_run(tmp_path / "r")
    with pytest.raises(InputError, match="existing run folder"):
        load_run(tmp_path / "nothing")


def test_config_validation() -> None:
    with pytest.raises(InputError, match="--method"):
        TrainConfig(method="gan")
    with pytest.raises(InputError, match="--steps"):
        TrainConfig(steps=0)
    with pytest.raises(InputError, match="--ema"):
        TrainConfig(ema=1.0)
    with pytest.raises(InputError, match="option 'nope'"):
        train(TrainConfig(**{**TINY, "options": {"nope": 1}}), "/tmp/never-created-iterflow")
    with pytest.raises(InputError, match="coupling"):
        train(
            TrainConfig(**{**TINY, "options": {"coupling": "magic"}}), "/tmp/never-created-iterflow"
        )


def test_lr_schedule_and_standardization() -> None:
    cfg = TrainConfig(lr=1.0, steps=1000)
    assert lr_at(cfg, 0) == pytest.approx(0.01)
    assert lr_at(cfg, 99) == pytest.approx(1.0)
    assert lr_at(cfg, 999) == pytest.approx(0.05, abs=1e-3)
    x = torch.randn(1000, 3, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0]) + 5
    shift, scale = standardization(x, "dim")
    u = (x - shift) / scale
    assert torch.allclose(u.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    s_shift, s_scale = standardization(torch.randn(10, 1, 4, 4), "auto")
    assert s_shift.shape == (1, 4, 4) and bool((s_scale == s_scale.flatten()[0]).all())


def test_minibatch_ot_is_optimal_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    cost = torch.cdist(x0, x1).pow(2)
    best = min(
        sum(float(cost[i, p[i]]) for i in range(6)) for p in itertools.permutations(range(6))
    )
    for solver in ("emd", "lsa"):
        perm = assignment(x0, x1, solver)
        assert sum(float(cost[i, perm[i]]) for i in range(6)) == pytest.approx(best)
    a, b = couple(x0, x1, "ot")
    assert torch.equal(a, x0) and sorted(b[:, 0].tolist()) == sorted(x1[:, 0].tolist())
    _, c = couple(x0, x1, "sinkhorn", generator=g)
    assert c.shape == x1.shape


@pytest.mark.parametrize("name", ["straight", "trig"])
def test_interpolant_endpoints_and_velocity(name: str) -> None:
    path = get_interpolant(name)
    g = torch.Generator().manual_seed(0)
    x0, x1 = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    zeros, ones = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    assert torch.allclose(path.sample(x0, x1, zeros).x, x0)
    assert torch.allclose(path.sample(x0, x1, ones).x, x1)
    s = torch.rand(5, generator=g, dtype=torch.float64) * 0.8 + 0.1
    h = 1e-6
    fd = (path.sample(x0, x1, s + h).x - path.sample(x0, x1, s - h).x) / (2 * h)
    assert torch.allclose(path.sample(x0, x1, s).dx, fd, atol=1e-7)


def test_sklearn_like_estimator(tmp_path: Path) -> None:
    import numpy as np

    from iterflow.apps.estimator import FlowDensity

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 2)) * np.array([3.0, 0.5]) + np.array([10.0, -4.0])
    model = FlowDensity(
        steps=150, hidden=(32, 32), batch_size=256, run_dir=tmp_path, solver="rk4"
    ).fit(X)
    s = model.sample(2000, random_state=1)
    assert s.shape == (2000, 2)
    assert np.allclose(s.mean(0), [10.0, -4.0], atol=0.5)  # samples come back in the data's units
    lp = model.score_samples(X[:100])
    from scipy.stats import multivariate_normal

    true = multivariate_normal([10.0, -4.0], np.diag([9.0, 0.25])).logpdf(X[:100])
    assert abs(lp.mean() - true.mean()) < 0.3  # a Gaussian is easy: close to the true log-density
    with pytest.raises(InputError, match="X"):
        FlowDensity().fit(np.zeros(5))
    with pytest.raises(InputError, match="fitted"):
        FlowDensity().sample(3)
