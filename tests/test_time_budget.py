"""A time budget for a stage (``OptimConfig.time_budget``, ``iterflow train --time-budget``): the
step count it fixes at the end of the warm-up, the schedule it then follows, the hard stop, the
resumes and the bad values.

The loop's clock (``iterflow.train.loop._clock``) is replaced by one that advances a fixed number
of seconds per optimiser step, so every plan is exact and the tests do not time anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from iterflow.core import distributed as ddp
from iterflow.errors import InputError
from iterflow.methods.base import Loss
from iterflow.train import TrainConfig
from iterflow.train import loop as loop_module
from iterflow.train.loop import Checkpoint, OptimConfig, StepBudget, optimize

DT = torch.float64


class StepClock:
    """Seconds as a function of the optimiser steps taken: ``per_step(i)`` seconds for step ``i``
    (0-based, counted over every run in the test, as a wall clock would be)."""

    def __init__(self, per_step) -> None:  # noqa: ANN001
        self.per_step, self.steps, self.now = per_step, 0, 0.0

    def tick(self) -> None:
        self.now += self.per_step(self.steps)
        self.steps += 1

    def __call__(self) -> float:
        return self.now


def _problem(seed: int, dim: int) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, dim, generator=g, dtype=DT)
    y = x @ torch.randn(dim, 2, generator=g, dtype=DT) + 0.1 * torch.randn(
        200, 2, generator=g, dtype=DT
    )
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, 2)).to(DT), (x, y)


def _run(
    cfg: OptimConfig,
    clock: StepClock | None,
    monkeypatch: pytest.MonkeyPatch,
    *,
    seed: int = 0,
    dim: int = 3,
    folder: Path | None = None,
    stop: int | None = None,
    reporter: object = None,
) -> tuple[nn.Module, dict]:
    if clock is not None:
        monkeypatch.setattr(loop_module, "_clock", clock)
    net, data = _problem(seed, dim)

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        if clock is not None:
            clock.tick()
        x, y = batch
        rows = ddp.local_rows(x.shape[0])
        r = (net(x[rows]) - y[rows]).pow(2).sum(1)
        return Loss(r, x.shape[0], {"mse": r.detach()})

    ck = Checkpoint(folder, "stage") if folder is not None else None
    rec = optimize(net, loss_fn, data, cfg, generator=torch.Generator().manual_seed(seed + 1),
                   checkpoint=ck, budget=StepBudget(stop), reporter=reporter)  # type: ignore[arg-type]  # fmt: skip
    return net, rec


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# (seconds per step, budget, the steps it leaves after the plan at step 100): binary fractions,
# so the plan's arithmetic is exact.
@pytest.mark.parametrize("dim", [1, 3, 7])
@pytest.mark.parametrize(("dt", "budget", "planned"), [(1 / 64, 5.0, 320), (1 / 32, 12.5, 400)])
def test_the_budget_fixes_the_step_count_and_the_run_equals_a_run_of_that_many_steps(
    dim: int,
    dt: float,
    budget: float,
    planned: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = OptimConfig(steps=5000, batch_size=32, lr=0.01, ema=0.99, log_every=10,
                      time_budget=budget)  # fmt: skip
    net, rec = _run(cfg, StepClock(lambda i: dt), monkeypatch, dim=dim, seed=dim, folder=tmp_path)
    assert rec["steps"] == rec["planned_steps"] == planned and rec["time_budget"] == budget
    assert rec["seconds_optimize"] == pytest.approx(budget, abs=1e-12)
    # The same weights as a run told the step count from the start with the cap's warm-up (100
    # steps; `planned` steps alone would warm up over 32 / 40): the plan changes nothing else.
    fixed = OptimConfig(steps=planned, warmup=100, batch_size=32, lr=0.01, ema=0.99, log_every=10)
    ref, ref_rec = _run(fixed, None, monkeypatch, dim=dim, seed=dim)
    assert _same(net, ref) and "time_budget" not in ref_rec
    # ... and the budgeted run's schedule ended where a schedule of `planned` steps ends: its last
    # logged step is the planned one, at 5% of the peak learning rate.
    last = Checkpoint(tmp_path, "stage").read_log()[-1]
    assert last["step"] == planned and last["lr"] == pytest.approx(0.05 * 0.01, rel=1e-3)


def test_the_cap_holds_when_the_budget_allows_more(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OptimConfig(steps=400, batch_size=32, lr=0.01, time_budget=1e6)
    net, rec = _run(cfg, StepClock(lambda i: 1 / 64), monkeypatch)
    ref, _ = _run(OptimConfig(steps=400, batch_size=32, lr=0.01), None, monkeypatch)
    assert rec["steps"] == 400 and _same(net, ref)


def test_a_budget_spent_before_the_plan_ends_the_stage_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = OptimConfig(steps=5000, batch_size=32, lr=0.01, log_every=7, time_budget=1.0)
    _, rec = _run(cfg, StepClock(lambda i: 1 / 32), monkeypatch)  # 1 s = 32 steps, plan at 100
    assert rec["steps"] == 32 and rec["seconds_optimize"] == pytest.approx(1.0)
    assert rec["planned_steps"] is None


def test_steps_slower_than_timed_end_the_stage_when_the_seconds_are_spent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1/64 s a step through the warm-up: planned 320 steps for 5 s; then twice as slow, so the
    # seconds are spent after 100 + (5 - 100/64) / (2/64) = 210 steps.
    clock = StepClock(lambda i: 1 / 64 if i < 100 else 2 / 64)
    planned: list[int] = []

    class Recorder:
        def stage_start(self, *args: object) -> None: ...
        def step(self, step: int, terms: dict) -> None: ...
        def stage_end(self, record: dict) -> None: ...
        def stage_planned(self, total: int) -> None:
            planned.append(total)

    cfg = OptimConfig(steps=5000, batch_size=32, lr=0.01, log_every=25, time_budget=5.0)
    _, rec = _run(cfg, clock, monkeypatch, folder=tmp_path, reporter=Recorder())
    assert planned == [320]
    assert rec["steps"] == 210 and rec["seconds_optimize"] == pytest.approx(5.0)
    assert rec["planned_steps"] == 320
    log = Checkpoint(tmp_path, "stage").read_log()
    assert log[-1]["step"] == 210  # the last step is logged
    # its learning rate is the planned schedule's at step 210, short of the end (5% of the peak)
    assert (
        log[-1]["lr"] == pytest.approx(cfg.planned(320).lr_at(209)) and log[-1]["lr"] > 0.02 * 0.01
    )


@pytest.mark.parametrize("cut", [70, 260])  # before the plan (step 100) and after it
def test_a_budgeted_stage_resumes_to_the_same_weights(
    cut: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = OptimConfig(steps=5000, batch_size=32, lr=0.01, ema=0.99, checkpoint_every=40,
                      log_every=10, time_budget=5.0)  # fmt: skip
    ref, ref_rec = _run(cfg, StepClock(lambda i: 1 / 64), monkeypatch)
    clock = StepClock(lambda i: 1 / 64)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, clock, monkeypatch, folder=tmp_path, stop=cut)
    saved = json.loads((tmp_path / "progress.json").read_text())
    assert saved["planned_steps"] == (320 if cut > 100 else None)
    net, rec = _run(cfg, clock, monkeypatch, folder=tmp_path)
    assert rec["steps"] == ref_rec["steps"] == 320 and _same(net, ref)
    # The seconds of the steps lost to the cut are not the stage's: it spent its 5 s on 320 steps.
    assert rec["seconds_optimize"] == pytest.approx(5.0)
    steps = [r["step"] for r in Checkpoint(tmp_path, "stage").read_log()]
    assert steps == list(range(10, 321, 10))


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan, "soon"])
def test_bad_budgets_name_the_argument(bad: object) -> None:
    with pytest.raises(InputError) as err:
        OptimConfig(steps=10, batch_size=4, lr=1e-3, time_budget=bad)  # type: ignore[arg-type]
    assert err.value.argument == "time_budget"
    with pytest.raises(InputError) as err:
        TrainConfig(time_budget=bad)  # type: ignore[arg-type]
    assert err.value.argument == "time_budget"


def test_train_config_passes_the_budget_to_every_stage() -> None:
    cfg = TrainConfig.for_method("jko", time_budget=12)
    assert cfg.time_budget == 12.0 and cfg.optim_config().time_budget == 12.0
    assert TrainConfig().optim_config().time_budget == 0.0


def test_the_command_line_trains_within_a_budget_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.cli import main

    tiny = ["--batch-size", "64", "--hidden", "16,16", "--n-train", "500", "--n-val", "100",
            "--n-test", "100", "--eval-n", "100", "--quiet", "--no-report"]  # fmt: skip
    out = tmp_path / "run"
    # A cap of 200,000 steps no CPU takes in 3 s: the budget decides the step count.
    code = main(["train", "--data", "moons", "--steps", "200000", "--time-budget", "3",
                 "--out", str(out), *tiny])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "time_budget = 3.0" in (out / "config.toml").read_text()
    (stage,) = json.loads((out / "meta.json").read_text())["history"]
    assert stage["time_budget"] == 3.0 and 20 <= stage["steps"] < 200_000
    assert stage["seconds_optimize"] < 3.0 + 1.0  # the stop comes after a step, not during one
    for value in ("-1", "inf", "nan"):
        code = main(["train", "--time-budget", value, "--out", str(tmp_path / "x"), *tiny])
        err = capsys.readouterr().err
        assert code == 2 and "--time-budget" in err and "Traceback" not in err, err


def _rank_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        torch.set_num_threads(1)
        # rank 1 takes twice as long a step: its plan (160 steps) and rank 0's (320) differ
        loop_module._clock = StepClock(lambda i: 1 / 64 if rank == 0 else 1 / 32)
        net, data = _problem(0, 3)

        def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
            loop_module._clock.tick()  # type: ignore[attr-defined]
            x, y = batch
            rows = ddp.local_rows(x.shape[0])
            r = (net(x[rows]) - y[rows]).pow(2).sum(1)
            return Loss(r, x.shape[0], {"mse": r.detach()})

        cfg = OptimConfig(steps=5000, batch_size=32, lr=0.01, log_every=10, time_budget=5.0)
        rec = optimize(net, loss_fn, data, cfg, generator=torch.Generator().manual_seed(1),
                       ctx=ddp.DistContext(rank, world, rank, "gloo"))  # fmt: skip
        flat = torch.cat([p.detach().flatten() for p in net.parameters()])
        Path(out, f"{rank}.json").write_text(
            json.dumps({"steps": rec["steps"], "w": flat.tolist()})
        )
    finally:
        dist.destroy_process_group()


def test_data_parallel_ranks_take_one_step_count(tmp_path: Path) -> None:
    """The ranks' plans are averaged (240 steps) and a rank that spends the budget first (rank 1,
    after 160 steps) ends the stage on every rank: no rank waits for another's collective."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert a["steps"] == b["steps"] == 160
    assert a["w"] == b["w"]


def test_reflow_and_distill_do_not_inherit_the_sources_budget() -> None:
    """A run trained under a budget (``make demo``'s) is a source for ``iterflow reflow`` and
    ``distill``, whose ``--steps`` replace the training: its budget must not cap them."""
    from iterflow.cli.reflow import _derived_config

    src = TrainConfig.for_method("fm", steps=6000, time_budget=30)
    cfg = _derived_config(src, "reflow", {}, steps=20_000, batch_size=None, lr=None, device="cpu")
    assert (cfg.steps, cfg.time_budget, cfg.optim_config().time_budget) == (20_000, 0.0, 0.0)
