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
    with pytest.raises(InputError, match="^out: ") as err:
        train(cfg, tmp_path / "junk")
    assert err.value.argument == "out"  # the Python argument; the CLI names its flag --out
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="^out: must be a folder.*not a file"):
        train(cfg, tmp_path / "file.txt")
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
    record = tmp_path / "r" / "manifest.json"  # the commit record (meta.json: a copy for format 1)
    manifest = json.loads(record.read_text())
    manifest["networks"][0]["hidden"] = [16, 16]
    record.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="must match the network"):
        load_run(tmp_path / "r")
    record.write_text("{not json")
    with pytest.raises(InputError, match="manifest.json must be valid JSON"):
        load_run(tmp_path / "r")
    record.write_text("")
    with pytest.raises(InputError, match="manifest.json must not be empty"):
        load_run(tmp_path / "r")
    with pytest.raises(InputError, match="existing run folder"):
        load_run(tmp_path / "nothing")


def test_config_validation() -> None:
    with pytest.raises(InputError, match="^method: "):
        TrainConfig(method="gan")
    with pytest.raises(InputError, match="^steps: "):
        TrainConfig(steps=0)
    with pytest.raises(InputError, match="^ema: "):
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


# ------------------------------------------------------------------------------------------------
# The run folder: manifest.json (format 2), format-1 folders, newer formats refused
# ------------------------------------------------------------------------------------------------

PROGRESSIVE = dict(TINY, method="local-fm", blocks=2, steps=30, checkpoint_every=10)


def test_manifest_is_the_commit_record(tmp_path: Path) -> None:
    from iterflow.io import FORMAT_VERSION

    cfg = TrainConfig(**PROGRESSIVE, options={"h": "0.05"})
    train(cfg, tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert manifest["kind"] == "train" and manifest["format_version"] == FORMAT_VERSION == 2
    assert manifest["config"] == cfg.to_json() and manifest["config"]["options"] == {"h": 0.05}
    assert manifest["stages_done"] == 2 and len(manifest["networks"]) == 2
    assert manifest["data"]["name"] == "8gaussians" and manifest["event_shape"] == [2]
    assert manifest["normalization"]["shape"] == [2]
    assert manifest["method_options"]["h"] == 0.05 and "h_growth" in manifest["method_options"]
    assert manifest["history"] == meta["history"] and len(meta["history"]) == 2
    assert {k: v for k, v in manifest.items() if k not in ("kind", "config")} == meta
    assert load_run(tmp_path / "r")[2] == meta


def _interrupted_after_stage_0(cfg: TrainConfig, out: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, stop_after_steps=cfg.steps + 15)  # stage 0 committed, stage 1 half done
    assert json.loads((out / "manifest.json").read_text())["stages_done"] == 1


def test_format_1_folder_loads_and_resumes(tmp_path: Path) -> None:
    """A folder of the previous format (meta.json as commit record, options as text) still works."""
    cfg = TrainConfig(**PROGRESSIVE, options={"h": 0.05})
    ref = train(cfg, tmp_path / "ref").flow
    old = tmp_path / "old"
    _interrupted_after_stage_0(cfg, old)
    (old / "manifest.json").unlink()
    meta = json.loads((old / "meta.json").read_text())
    for key in ("method_options", "normalization"):
        del meta[key]
    (old / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "options": {"h": "0.05"}}))
    resumed = train(cfg, old).flow
    for p, q in zip(weights(ref), weights(resumed)):
        assert torch.equal(p, q)
    assert json.loads((old / "manifest.json").read_text())["stages_done"] == 2  # now format 2
    (old / "manifest.json").unlink()  # a finished format-1 folder loads too
    (old / "meta.json").write_text(json.dumps({**json.loads((old / "meta.json").read_text()),
                                               "format_version": 1}))  # fmt: skip
    flow, cfg2, meta2 = load_run(old)
    assert cfg2 == cfg and meta2["stages_done"] == 2 and flow.num_blocks == 2


def test_particles_ahead_of_the_record_are_pushed_again(tmp_path: Path) -> None:
    """A kill between the particle cache and the commit record: resume replays the committed
    stages instead of training stage 1 on particles that stage 1 already pushed."""
    from iterflow.io import load_tensors, save_tensors

    cfg = TrainConfig(**PROGRESSIVE)
    ref = train(cfg, tmp_path / "ref").flow
    out = tmp_path / "r"
    _interrupted_after_stage_0(cfg, out)
    cache = load_tensors(out / "particles.safetensors")
    ahead = {
        "train": cache["train"] + 1.0,
        "val": cache["val"] + 1.0,
        "stages_done": torch.tensor(2),
    }
    save_tensors(out / "particles.safetensors", ahead)
    resumed = train(cfg, out).flow
    for p, q in zip(weights(ref), weights(resumed)):
        assert torch.allclose(p, q, atol=1e-12)


def test_newer_format_is_refused(tmp_path: Path) -> None:
    cfg = TrainConfig(**TINY)
    train(cfg, tmp_path / "r")
    path = tmp_path / "r" / "manifest.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "format_version": 3}))
    with pytest.raises(InputError, match="format 3 by a newer iterflow") as err:
        load_run(tmp_path / "r")
    assert err.value.argument == "run"
    with pytest.raises(InputError, match="newer iterflow") as err:
        train(cfg, tmp_path / "r")  # resuming refuses it too
    assert err.value.argument == "out"
    path.unlink()  # a format-1 reader's view: meta.json alone, of a newer format
    meta = tmp_path / "r" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 3}))
    with pytest.raises(InputError, match="newer iterflow"):
        load_run(tmp_path / "r")
    path.write_text(json.dumps({**json.loads(good), "kind": "transport"}))
    with pytest.raises(InputError, match="must be a 'train' folder"):
        load_run(tmp_path / "r")
