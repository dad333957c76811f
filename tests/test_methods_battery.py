"""One battery over every registered training method (:data:`iterflow.methods.METHODS`), in float64.

For each method, on tiny settings (a one-layer MLP of width 16, a few dozen steps, two blocks where
the method trains several):

(a) the loss of a minibatch is finite, per row, for every stage;
(b) its gradient reaches every trainable parameter of the stage (none is ``None`` or all zero);
(c) a run folder loads back (:func:`iterflow.train.load_run`) into the trained flow: the same
    weights, configuration, ``log_prob`` and samples, bit for bit;
(d) a run interrupted after a checkpoint (``stop_after_steps``) and re-run ends with the weights and
    logged losses of the uninterrupted run, bit for bit;
(e) two gloo processes under ``torchrun`` train the weights one process trains (up to summation
    order: ``atol = 1e-10``).

``reflow`` and ``distill`` need a source run: a flow-matching run trained once per session. A method
registered without a battery setting fails :func:`test_every_registered_method_has_a_battery_setting`.

The worker half of this file runs under ``python -m torch.distributed.run`` (``--worker``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from iterflow.core.flow import Block, Flow
from iterflow.data import get_dataset
from iterflow.methods import METHODS, Method, parse_options
from iterflow.train import (
    TrainConfig,
    TrainResult,
    build_velocity,
    load_run,
    stage_seed,
    standardization,
    train,
)

DT = torch.float64

#: The methods of the package (a test module may register toy methods of its own: not these).
BUILTIN = [name for name in METHODS if METHODS.get(name).__module__.startswith("iterflow.")]

# 31 rows per batch and 33 validation rows: the two ranks of (e) hold shards of unequal length.
BASE: dict[str, Any] = dict(
    data="8gaussians",
    steps=24,
    batch_size=31,
    hidden=(16,),
    n_train=96,
    n_val=33,
    n_test=16,
    checkpoint_every=8,
    log_every=4,
    lr=5e-3,
    ema=0.9,
    dtype="float64",
    seed=3,
)
PAIRS: dict[str, Any] = {"n_pairs": 64, "pair_steps": 4, "push_steps": 4}

#: Per method: TrainConfig fields beyond BASE (``options["source"]`` is filled in for paired methods).
SETTINGS: dict[str, dict[str, Any]] = {
    "fm": {"options": {"coupling": "ot", "push_steps": 4}},
    "cnf": {"blocks": 2, "steps": 12,
            "options": {"steps": 2, "kinetic": 0.1, "jacobian": 0.1, "divergence": "hutchinson"}},
    "jko": {"blocks": 2, "steps": 12,
            "options": {"substeps": 1, "jacobian": 0.1, "push_steps": 4}},
    "local-fm": {"blocks": 2, "options": {"push_steps": 4, "report_n": 33}},
    "reflow": {"options": {**PAIRS}},
    "distill": {"options": {**PAIRS, "k_steps": 2}},
}  # fmt: skip
#: The flow-matching run reflow and distill start from (same network, data and normalisation).
SOURCE = TrainConfig(**{**BASE, "options": {"push_steps": 4}})


def config(name: str, source: Path) -> TrainConfig:
    """The battery's configuration of method ``name`` (``source``: the run reflow/distill start from)."""
    setting = SETTINGS[name]
    options = dict(setting.get("options", {}))
    if "source" in {f.name for f in dataclasses.fields(METHODS.get(name).Options)}:
        options["source"] = str(source)
    return TrainConfig(method=name, **{**BASE, **setting, "options": options})


def interruptions(cfg: TrainConfig) -> list[int]:
    """Optimiser steps of each interrupted call of (d): the first stops inside stage 0, a few steps
    after a checkpoint; with several stages the second resumes there and stops inside the last
    stage (a few steps after its first checkpoint), so a committed stage is resumed too."""
    n_stages = len(_method(cfg).stages())
    every = cfg.checkpoint_every
    first = every + every // 2 - 1
    assert first < cfg.steps, "the battery's steps must exceed its first interruption"
    if n_stages == 1:
        return [first]
    return [first, (n_stages - 1) * cfg.steps - every + first]


def _method(cfg: TrainConfig) -> Method:
    """The method of ``cfg`` as the trainer builds it (on the battery's 2-D data)."""
    cls = METHODS.get(cfg.method)
    return cls(parse_options(cls, cfg.options), event_shape=(2,), num_blocks=cfg.blocks)


def _weights(flow: Flow) -> list[torch.Tensor]:
    return [t.detach() for t in flow.state_dict().values()]


def _losses(history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The logged losses of each stage (timings and sizes left out)."""
    return [{k: v for k, v in r.items() if k.startswith(("final_", "mean_"))} for r in history]


# ------------------------------------------------------------------------------------------------
# Fixtures: the source run, each method's one-process run and the two-process runs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny flow-matching run, the source of reflow and distill."""
    path = tmp_path_factory.mktemp("battery") / "source"
    train(SOURCE, path)
    return path


@pytest.fixture(scope="module")
def runs() -> dict[str, TrainResult]:
    """Each method's uninterrupted one-process run, trained on first use."""
    return {}


@pytest.fixture
def one(
    name: str,
    runs: dict[str, TrainResult],
    source: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> TrainResult:
    """Method ``name``'s uninterrupted one-process run."""
    if name not in runs:
        runs[name] = train(config(name, source), tmp_path_factory.mktemp("one") / name)
    return runs[name]


@pytest.fixture(scope="module")
def two(
    tmp_path_factory: pytest.TempPathFactory, source: Path, torchrun: Callable[..., Any]
) -> Path:
    """The folder of every method's run by two gloo processes (one ``torchrun`` for all)."""
    folder = tmp_path_factory.mktemp("two")
    torchrun(__file__, "--worker", str(folder), str(source), timeout=300)
    return folder


@pytest.fixture(params=BUILTIN)
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ------------------------------------------------------------------------------------------------
# The battery
# ------------------------------------------------------------------------------------------------


def test_every_registered_method_has_a_battery_setting() -> None:
    assert {"fm", "cnf", "jko", "local-fm", "reflow", "distill"} <= set(BUILTIN)
    missing = sorted(set(BUILTIN) - set(SETTINGS))
    assert not missing, f"add a battery setting for the registered method(s) {missing}"


def test_loss_is_finite_and_reaches_every_parameter(name: str, source: Path) -> None:
    """(a) + (b): each stage's loss on a minibatch of the normalised data, built as the trainer does."""
    cfg = config(name, source)
    method = _method(cfg)
    x = get_dataset(cfg.data).splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed).train.to(DT)
    shift, scale = standardization(x, cfg.standardize)
    particles = (x - shift) / scale
    for k, indices in enumerate(method.stages()):
        blocks = [
            Block(build_velocity(cfg, (2,), stage_seed(cfg.seed, j, salt=1))) for j in indices
        ]
        stage = Flow(blocks, (2,)).to(DT)
        gen = torch.Generator().manual_seed(stage_seed(cfg.seed, k, salt=2))
        data = method.stage_data(stage, particles, k, gen)
        if callable(data):  # a method that draws its own minibatches (e.g. pairs coupled ahead)
            batch = data(gen, cfg.batch_size)
            getattr(data, "close", lambda: None)()
        else:
            batch = tuple(t[: cfg.batch_size] for t in data)
        loss = method.loss(stage, batch, k, gen)
        assert loss.n == cfg.batch_size and loss.rows.shape == (cfg.batch_size,)
        assert loss.rows.dtype == DT
        value = loss.value()
        assert value.ndim == 0 and torch.isfinite(value), (name, k, value)
        assert all(bool(torch.isfinite(t).all()) for t in loss.terms.values()), loss.terms
        value.backward()
        for pname, p in stage.named_parameters():
            assert p.grad is not None, f"{name} stage {k}: no gradient reaches {pname}"
            assert bool(torch.isfinite(p.grad).all()), f"{name} stage {k}: {pname}"
            assert float(p.grad.abs().max()) > 0, f"{name} stage {k}: zero gradient on {pname}"


def test_run_folder_loads_back_into_the_trained_flow(
    name: str, one: TrainResult, source: Path
) -> None:
    """(c): ``load_run`` gives the trained flow: weights, config, log_prob and samples."""
    flow, cfg, meta = load_run(one.run_dir)
    assert cfg == config(name, source)
    assert cfg.to_json() == TrainConfig.from_json(cfg.to_json()).to_json()
    assert flow.num_blocks == one.flow.num_blocks == cfg.blocks
    assert len(meta["history"]) == len(_method(cfg).stages())
    for a, b in zip(_weights(one.flow), _weights(flow), strict=True):
        assert a.dtype == b.dtype == DT and torch.equal(a, b)
    x = one.splits.test.to(DT)
    lp_trained = one.flow.log_prob(x, solver="rk4", steps=4)
    assert bool(torch.isfinite(lp_trained).all())
    assert torch.equal(lp_trained, flow.log_prob(x, solver="rk4", steps=4))
    s1 = one.flow.sample(8, generator=torch.Generator().manual_seed(0), solver="rk4", steps=4)
    s2 = flow.sample(8, generator=torch.Generator().manual_seed(0), solver="rk4", steps=4)
    assert torch.equal(s1, s2)


def test_resume_after_an_interruption_equals_the_uninterrupted_run(
    name: str, one: TrainResult, source: Path, tmp_path: Path
) -> None:
    """(d): interrupted (after in-stage checkpoints, and across a stage boundary) then re-run."""
    cfg = config(name, source)
    out = tmp_path / "resumed"
    for k in interruptions(cfg):
        with pytest.raises(KeyboardInterrupt):
            train(cfg, out, stop_after_steps=k)
        assert (out / "progress.json").exists()  # it stopped inside a stage, after a checkpoint
    resumed = train(cfg, out)
    for a, b in zip(_weights(one.flow), _weights(resumed.flow), strict=True):
        assert torch.equal(a, b), (name, float((a - b).abs().max()))
    assert _losses(resumed.history) == _losses(one.history)
    assert not (out / "progress.json").exists()


@pytest.mark.parametrize("paired", ["reflow", "distill"])
def test_online_pairs_resume_like_the_uninterrupted_run(
    paired: str, source: Path, tmp_path: Path
) -> None:
    """(d) with the pool re-simulated every 5 steps (``regenerate_every``), for both paired methods."""
    cfg = config(paired, source)
    cfg = dataclasses.replace(cfg, options={**cfg.options, "regenerate_every": 5})
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", stop_after_steps=interruptions(cfg)[0])
    resumed = train(cfg, tmp_path / "resumed")
    for a, b in zip(_weights(whole.flow), _weights(resumed.flow), strict=True):
        assert torch.equal(a, b), (paired, float((a - b).abs().max()))


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_weights_as_one(
    name: str, one: TrainResult, two: Path
) -> None:
    """(e): the two-process run (global batch sharded over the ranks) against the one-process run."""
    flow, _, meta = load_run(two / name)
    assert all(r["world_size"] == 2 for r in meta["history"])
    for a, b in zip(_weights(one.flow), _weights(flow), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), (name, float((a - b).abs().max()))
    for r1, r2 in zip(_losses(one.history), _losses(meta["history"]), strict=True):
        assert r1.keys() == r2.keys()
        for key in r1:  # logged losses are global means
            # every logged term is reduced in float64 (loop._terms)
            assert r1[key] == pytest.approx(r2[key], rel=0, abs=1e-10), (name, key)


def _worker(folder: Path, source: Path) -> None:
    """One rank of the two-process runs (started by torchrun)."""
    torch.set_num_threads(1)
    for name in BUILTIN:
        result = train(config(name, source), folder / name)
        assert result.history[-1]["world_size"] == 2


if __name__ == "__main__" and "--worker" in sys.argv:
    at = sys.argv.index("--worker")
    _worker(Path(sys.argv[at + 1]), Path(sys.argv[at + 2]))
