"""The one trainer: progressive (block after block) or end to end (one stage), with EMA, atomic
checkpoints, resumption and logs.

For stage ``k`` the trainer

1. builds the stage's blocks (warm-started from the previous block when the method trains one block
   per stage), seeded from ``(seed, k)`` so that a resumed run rebuilds the same chain;
2. optimises ``method.loss`` on minibatches of the particles that stages ``< k`` pushed (cached on disk,
   earlier blocks are never re-run), keeping an exponential moving average of the weights;
3. pushes the training and validation particles through the EMA blocks, logs the movement
   ``E|x_after - x_before|^2``, the time and the function evaluations, and
4. writes the blocks, the pushed particles and ``meta.json`` atomically (``meta.json`` last: it is the
   commit record). Every ``checkpoint_every`` steps inside a stage it also saves the optimiser, EMA and
   random-generator states, so that ``kill -9`` loses at most that many steps.

Run-folder layout: ``config.json``, ``meta.json``, ``blocks/block_XXX.safetensors``,
``normalization.safetensors``, ``particles.safetensors`` (cache), ``progress.*`` (inside a stage),
``log.jsonl``.

Speed: the hot loop samples minibatches by index from tensors prepared once per stage, runs the loss
under bf16 autocast where that is measured to keep results (``TrainConfig.autocast``), uses the fused
Adam kernel, and updates the EMA with one foreach call. Under ``torchrun`` the same function trains
data-parallel with DDP and gives the one-process model (:mod:`iterflow.distributed`): every rank
draws the global batch, computes its shard, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow._version import __version__
from iterflow.core import distributed as ddp
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import build_network
from iterflow.core.store import load_flow
from iterflow.data import Splits, get_dataset
from iterflow.errors import InputError, fail
from iterflow.io import FORMAT_VERSION, RunDir, load_json, load_tensors, save_json, save_tensors
from iterflow.methods import METHODS, Loss, Method, parse_options
from iterflow.train.config import (
    DTYPES,
    RUNTIME_KEYS,
    TrainConfig,
    autocast_dtype,
    build_velocity,
    config_hash,
    resolve_device,
    stage_seed,
    standardization,
)
from iterflow.train.loop import Checkpoint, Reporter, SilentReporter, StepBudget, optimize


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    flow: Flow
    history: list[dict[str, Any]]
    run_dir: Path
    splits: Splits


def _prepare_run_dir(
    run: RunDir, cfg: TrainConfig, resume: bool, ctx: ddp.DistContext | None = None
) -> dict[str, Any] | None:
    """Create the folder, or return the existing meta when resuming the same config.

    Under data-parallel training every rank validates the folder, then rank 0 alone creates it.
    """
    if run.config.exists():
        old = load_json(run.config, "--out")
        try:
            old_cfg = TrainConfig.from_json(old)
        except (TypeError, InputError) as e:
            fail("--out", f"holds a config.json this version cannot read ({e})", str(run.path))
        if config_hash(old_cfg) != config_hash(cfg):
            diff = {
                k: (old.get(k), v)
                for k, v in cfg.to_json().items()
                if old.get(k) != v and k not in RUNTIME_KEYS
            }
            fail(
                "--out",
                f"already holds a run with another config {diff}; use a new folder",
                str(run.path),
            )
        if not resume:
            fail("--out", "already holds a run; resume it or choose a new folder", str(run.path))
        return load_json(run.meta, "--out") if run.meta.exists() else None
    if run.path.exists() and any(run.path.iterdir()):
        fail("--out", "must be a new or empty folder, or a run folder to resume", str(run.path))
    ddp.barrier(ctx)  # every rank has seen the folder before rank 0 writes into it
    if ctx is None or ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_json(run.config, cfg.to_json())
    return None


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = True,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` into the run folder ``out`` (resuming it when it holds the same config).

    Arguments:
        cfg: the run's configuration.
        out: run folder.
        resume: continue an interrupted run with the same config (otherwise such a folder is an error).
        reporter: progress sink (default: silent).
        stop_after_steps: testing aid: raise ``KeyboardInterrupt`` after this many optimiser steps in
            this call (simulates an interruption after the last checkpoint).

    Returns:
        :class:`TrainResult` with the trained flow (data units) and the per-stage history.
    """
    reporter = reporter or SilentReporter()
    method_cls = METHODS.get(cfg.method, "--method")
    options = parse_options(method_cls, cfg.options)
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    ctx = ddp.setup(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    main = ctx is None or ctx.is_main
    if not main:
        reporter = SilentReporter()
    dataset = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir)
    splits = dataset.splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    train_x = splits.train.to(device=device, dtype=dtype)
    val_x = splits.val.to(device=device, dtype=dtype)
    event_shape = tuple(train_x.shape[1:])
    method = method_cls(options, event_shape=event_shape, num_blocks=cfg.blocks)
    amp = autocast_dtype(cfg, method, device, dtype)

    run = RunDir(out)
    meta = _prepare_run_dir(run, cfg, resume, ctx)
    shift, scale = (t.cpu() for t in standardization(train_x, cfg.standardize))
    if main:
        save_tensors(run.normalization, {"shift": shift, "scale": scale})
    norm = Flow([], event_shape, shift=shift.cpu(), scale=scale.cpu()).to(
        device=device, dtype=dtype
    )
    if meta is None:
        meta = {
            "format_version": FORMAT_VERSION,
            "iterflow_version": __version__,
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config_hash": config_hash(cfg),
            "data": dataset.describe(),
            "event_shape": list(event_shape),
            "networks": [],
            "stages_done": 0,
            "history": [],
            "train_seconds": 0.0,
        }
    stages = method.stages()
    blocks: list[Block] = []
    for i, net_cfg in enumerate(meta["networks"]):
        b = Block(build_network(net_cfg)).to(device=device, dtype=dtype)
        b.load_state_dict(load_tensors(run.block(i), "--out", device))
        blocks.append(b)
    done = meta["stages_done"]
    if done > 0:
        cache = load_tensors(run.particles, "--out", device)
        cur_train, cur_val = cache["train"].to(dtype), cache["val"].to(dtype)
    else:
        cur_train, cur_val = norm.normalize(train_x), norm.normalize(val_x)
    budget = StepBudget(stop_after_steps)
    for k in range(done, len(stages)):
        if meta["history"] and method.should_stop(meta["history"]):
            break
        t_stage = time.perf_counter()
        stage_blocks = _make_stage_blocks(cfg, stages[k], blocks, k, event_shape, device, dtype)
        stage = Flow(stage_blocks, event_shape).to(device=device, dtype=dtype)
        last = k == len(stages) - 1
        record = _optimize_stage(
            cfg, method, stage, cur_train, k, len(stages), run, reporter, budget, ctx, amp
        )
        stage.eval()
        with stage.count_nfe() as c_val:
            new_val = _push(method, stage, cur_val, ctx)
        new_train = None if last else _push(method, stage, cur_train, ctx)
        record.update(
            {
                "stage": k,
                "blocks": stages[k],
                "movement": float((new_val - cur_val).pow(2).flatten(1).sum(1).mean()),
                "push_nfe": c_val.nfe,
                **method.stage_report(stage, cur_val, new_val, k),
            }
        )
        # this call's wall time plus the optimisation time spent before an interruption
        record["seconds"] = time.perf_counter() - t_stage + record["seconds_before_resume"]
        blocks.extend(stage_blocks)
        meta["networks"].extend(_block_network_config(b) for b in stage_blocks)
        meta["stages_done"] = k + 1
        meta["history"].append(record)
        meta["train_seconds"] = float(meta["train_seconds"]) + record["seconds"]
        if main:  # commit: blocks, particles, then meta.json (the record that makes them count)
            for j, b in zip(stages[k], stage_blocks):
                save_tensors(run.block(j), b.state_dict())
            save_tensors(
                run.particles,
                {"train": (new_train if new_train is not None else cur_train[:0]), "val": new_val},
            )
            save_json(run.meta, meta)
            Checkpoint(run.path, k).clear()
        ddp.barrier(ctx)  # no rank looks for the next stage's progress file before this commit
        reporter.stage_end(record)
        cur_val = new_val
        cur_train = new_train if new_train is not None else cur_train
    ddp.barrier(ctx)  # the run folder is complete before any rank returns
    flow = Flow(blocks, event_shape, shift=shift.cpu(), scale=scale.cpu()).to(
        device=device, dtype=dtype
    )
    flow.eval()
    return TrainResult(flow=flow, history=meta["history"], run_dir=run.path, splits=splits)


def _push(method: Method, stage: Flow, x: Tensor, ctx: ddp.DistContext | None) -> Tensor:
    """``method.push`` of the particles ``x``; under data parallelism each rank pushes its shard of
    rows and the shards are all-gathered (pushes are row by row: fixed-step solvers)."""
    if ctx is None:
        return method.push(stage, x)
    lo, hi = ctx.bounds(x.shape[0])
    return ddp.all_gather_rows(method.push(stage, x[lo:hi]), x.shape[0], ctx)


def _optimize_stage(
    cfg: TrainConfig,
    method: Method,
    stage: Flow,
    particles: Tensor,
    k: int,
    n_stages: int,
    run: RunDir,
    reporter: Reporter,
    budget: StepBudget,
    ctx: ddp.DistContext | None,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    """Optimise the blocks of stage ``k`` on the one loop (:func:`iterflow.train.loop.optimize`)."""
    gen = torch.Generator(device=particles.device).manual_seed(stage_seed(cfg.seed, k, salt=2))
    data = method.stage_data(stage, particles, k, gen)
    view = _training_view(stage, cfg)

    def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
        return method.loss(view, batch, k, generator)

    return optimize(
        stage,
        loss_fn,
        data,
        cfg.optim_config(),
        generator=gen,
        checkpoint=Checkpoint(run.path, k, write=ctx is None or ctx.is_main),
        reporter=reporter,
        ctx=ctx,
        autocast=amp,
        stage=k,
        n_stages=n_stages,
        budget=budget,
    )


def _training_view(stage: Flow, cfg: TrainConfig) -> Flow:
    """The stage as the loss drives it: each velocity network through ``torch.compile`` when
    ``cfg.compile`` (sharing its parameters with ``stage``, which is what gets saved)."""
    if not cfg.compile:
        return stage
    blocks = [Block(torch.compile(b.velocity)) for b in stage.blocks]  # type: ignore[arg-type]
    view = Flow(blocks, stage.event_shape, shift=stage.shift, scale=stage.scale)
    return view.to(device=stage.shift.device, dtype=stage.shift.dtype)


def _block_network_config(b: Block) -> dict[str, Any]:
    cfg = getattr(b.velocity, "config", None)
    if cfg is None:
        raise TypeError(f"velocity network {type(b.velocity).__name__} must define config()")
    return cfg()


def _make_stage_blocks(
    cfg: TrainConfig,
    indices: list[int],
    previous: list[Block],
    k: int,
    event_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> list[Block]:
    out = []
    for j in indices:
        net = build_velocity(cfg, event_shape, stage_seed(cfg.seed, j, salt=1))
        if cfg.warm_start and previous and len(indices) == 1:
            try:
                net.load_state_dict(previous[-1].velocity.state_dict())
            except RuntimeError:
                pass  # architectures differ (e.g. a custom last block): keep the fresh init
        out.append(Block(net).to(device=device, dtype=dtype))
    return out


def load_run(path: str | Path, *, device: str = "cpu") -> tuple[Flow, TrainConfig, dict[str, Any]]:
    """Load a run folder: ``(flow, config, meta)``. Never unpickles; mismatches raise InputError."""
    run = RunDir(path)
    if not run.path.is_dir():
        fail("run", "must be an existing run folder", str(path))
    cfg = TrainConfig.from_json(load_json(run.config, "run"))
    meta = load_json(run.meta, "run")
    if not isinstance(meta, dict) or "networks" not in meta or "event_shape" not in meta:
        fail("run", "meta.json must hold 'networks' and 'event_shape'", str(run.meta))
    if meta.get("format_version", 0) > FORMAT_VERSION:
        fail(
            "run",
            f"was written by a newer iterflow (format {meta.get('format_version')}); upgrade",
            str(path),
        )
    if not meta["networks"]:
        fail("run", "must hold at least one trained block (is training still running?)", str(path))
    flow = load_flow(
        run,
        meta["networks"],
        meta["event_shape"],
        dtype=DTYPES[cfg.dtype],
        device=resolve_device(device),
        source="meta.json",
    )
    return flow, cfg, meta
