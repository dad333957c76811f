"""The one trainer: progressive (block after block) or end to end (one stage), with EMA, atomic
checkpoints, resumption and logs.

For stage ``k`` the trainer

1. builds the stage's blocks (warm-started from the previous block when the method trains one block
   per stage), seeded from ``(seed, k)`` so that a resumed run rebuilds the same chain;
2. optimises ``method.loss`` on minibatches of the particles that stages ``< k`` pushed (cached on disk,
   earlier blocks are never re-run), keeping an exponential moving average of the weights;
3. pushes the training and validation particles through the EMA blocks, logs the movement
   ``E|x_after - x_before|^2``, the time and the function evaluations, and
4. writes the blocks, the pushed particles, ``meta.json`` and ``manifest.json`` atomically (the
   manifest last: it is the commit record; :mod:`iterflow.train.folder`). Every
   ``checkpoint_every`` steps inside a stage it also saves the optimiser, EMA and random-generator
   states, so that ``kill -9`` loses at most that many steps.

Run-folder layout: ``config.json``, ``meta.json``, ``manifest.json``,
``blocks/block_XXX.safetensors``, ``normalization.safetensors``, ``particles.safetensors``
(cache), ``progress.*`` (inside a stage), ``log.jsonl``. Without a run folder (``out=None``) the
same training runs in memory and writes nothing (no checkpoints: an interruption loses the run).

Data. The core, :func:`train_tensors`, trains on tensors (:class:`TrainData`: training and validation
rows, their description, optional per-row conditioning); :func:`train` is the thin layer that builds
them from a data set name (:func:`iterflow.data.get_dataset`). Velocity networks are the built-in ones
of the config, or a user's module (or a factory of modules) called as ``v(x, t, **cond)``.

Speed: the hot loop samples minibatches by index from tensors prepared once per stage, runs the loss
under bf16 autocast where that is measured to keep results (``TrainConfig.autocast``), uses the fused
Adam kernel, and updates the EMA with one foreach call. Under ``torchrun`` the same function trains
data-parallel and gives the one-process model (:mod:`iterflow.core.distributed`): every rank
draws the global batch, computes its shard, and rank 0 alone writes the run folder.

This module holds the run (folder, resumption, the stage sequence, :func:`load_run`); one stage's
operations (building, optimising and pushing through its blocks) are in :mod:`iterflow.train.stages`.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iterflow._version import __version__
from iterflow.core import distributed as ddp
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import NETWORKS
from iterflow.core.store import load_flow
from iterflow.data import Splits, get_dataset
from iterflow.errors import fail
from iterflow.io import FORMAT_VERSION, RunDir, load_json, load_tensors, save_tensors
from iterflow.methods import METHODS, options_record, parse_options
from iterflow.train.config import (
    DTYPES,
    TrainConfig,
    autocast_dtype,
    config_hash,
    resolve_device,
    standardization,
)
from iterflow.train.folder import commit, prepare_run_dir, read_meta
from iterflow.train.inputs import (
    TrainData,
    VelocitySource,
    block_network_config,
    labelled_data,
    labels_record,
    rebuild_velocity,
)
from iterflow.train.loop import (
    Checkpoint,
    Reporter,
    SilentReporter,
    StepBudget,
    run_environment,
    warn_environment,
)
from iterflow.train.stages import (
    COND_REPORT_ROWS,
    PUSH_CHUNK,
    cond_to_device,
    make_stage_blocks,
    optimize_stage,
    push_particles,
    replay_particles,
    report_stage,
)

__all__ = ["COND_REPORT_ROWS", "PUSH_CHUNK", "TrainResult", "load_run", "train", "train_tensors"]


@dataclass
class TrainResult:
    """What :func:`train` and :func:`train_tensors` return.

    Attributes:
        flow: the trained flow (data units, evaluation mode).
        history: one record per trained stage (losses, movement, seconds, method figures).
        run_dir: the run folder (``None`` for a run trained without one).
        splits: the training, validation and test rows the run used.
    """

    flow: Flow
    history: list[dict[str, Any]]
    run_dir: Path | None
    splits: Splits


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out: str | Path | None,
    *,
    resume: bool = True,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` on the data set named ``cfg.data`` into the run folder ``out``.

    The thin layer of names over :func:`train_tensors`: the splits of the data set
    (:func:`iterflow.data.get_dataset`, ``cfg.n_train`` / ``n_val`` / ``n_test`` rows drawn from
    ``cfg.seed``) are its tensors.

    Arguments:
        cfg: the run's configuration.
        out: run folder, resumed when it holds the same config (``None``: train in memory and write
            nothing).
        resume: continue an interrupted run with the same config (otherwise such a folder is an error).
        reporter: progress sink (default: silent).
        stop_after_steps: testing aid: raise ``KeyboardInterrupt`` after this many optimiser steps in
            this call (simulates an interruption after the last checkpoint).

    Returns:
        :class:`TrainResult` with the trained flow (data units) and the per-stage history.
    """
    data = labelled_data(cfg) if cfg.labels else None
    if data is None:
        dataset = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir)
        splits = dataset.splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
        data = TrainData(splits.train, splits.val, dataset.describe(), test=splits.test)
    return train_tensors(
        cfg, data, out, resume=resume, reporter=reporter, stop_after_steps=stop_after_steps
    )


def train_tensors(
    cfg: TrainConfig,
    data: TrainData,
    out: str | Path | None = None,
    *,
    velocity: VelocitySource | None = None,
    resume: bool = True,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train ``cfg.method`` on the tensors ``data`` (the trainer's core; ``cfg.data`` only names them).

    For stage ``k`` the trainer builds the stage's blocks (seeded from ``(cfg.seed, k)``, warm-started
    from the previous block for progressive methods), optimises the method's loss on the particles
    the earlier stages pushed (:func:`iterflow.train.loop.optimize`), pushes the training and
    validation particles through the trained blocks and records the stage.

    Arguments:
        cfg: the run's configuration (its ``device`` and ``dtype`` apply to ``data``).
        data: training and validation rows, their description and optional conditioning.
        out: run folder (checkpoints, resumption, ``load_run``), or ``None``: train in memory and
            write nothing.
        velocity: the velocity network of every block instead of ``cfg``'s built-in one: a module
            ``v(x, t, **cond)`` (``x`` ``(B, *E)``; ``t`` a 0-dim tensor or ``(B,)``; ``cond`` the
            rows of ``data.cond``), deep-copied into each block (the module itself is not trained),
            or a factory ``() -> nn.Module`` called once per block under a seed derived from
            ``cfg.seed``. Saved with ``out`` as its ``config()`` when it has one (then
            :func:`load_run` rebuilds it), otherwise as weights only (pass ``velocity`` to
            :func:`load_run` again).
        resume, reporter, stop_after_steps: as in :func:`train`.

    Returns:
        :class:`TrainResult` with the trained flow (data units) and the per-stage history.
    """
    reporter = reporter or SilentReporter()
    method_cls = METHODS.get(cfg.method, "method")
    options = parse_options(method_cls, cfg.options)
    device, dtype = resolve_device(cfg.device), DTYPES[cfg.dtype]
    ctx = ddp.setup(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    main = ctx is None or ctx.is_main
    if not main:
        reporter = SilentReporter()
    train_x = data.train.to(device=device, dtype=dtype)
    val_x = data.val.to(device=device, dtype=dtype)
    cond = cond_to_device(data.cond, device, dtype)
    val_cond = cond_to_device(data.val_cond, device, dtype)
    event_shape = tuple(train_x.shape[1:])
    method = method_cls(options, event_shape=event_shape, num_blocks=cfg.blocks)
    if cond and not method.accepts_cond():
        fail(
            "cond",
            f"is not supported by method {cfg.method!r} (its minibatches are not data rows)",
            sorted(cond),
        )
    amp = autocast_dtype(cfg, method, device, dtype)

    run = RunDir(out) if out is not None else None
    writer = run if main else None  # the folder this process writes (rank 0 alone)
    meta = prepare_run_dir(run, cfg, resume, ctx) if run is not None else None
    shift, scale = (t.cpu() for t in standardization(train_x, cfg.standardize))
    if writer is not None:
        save_tensors(writer.normalization, {"shift": shift, "scale": scale})
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
            "data": data.description,
            "event_shape": list(event_shape),
            "networks": [],
            "stages_done": 0,
            "history": [],
            "train_seconds": 0.0,
        }
    environment = run_environment(method.environment())
    if meta["stages_done"] and main:  # resumed: were its finished stages trained where it resumes?
        warn_environment(meta.get("environment"), environment, f"the finished stages of {out}")
    meta.setdefault("environment", environment)
    meta.setdefault("method_options", options_record(options))  # all of them, defaults included
    meta.setdefault("normalization", {"mode": cfg.standardize, "shape": list(shift.shape)})
    if data.num_classes:
        meta.setdefault("labels", labels_record(data, cfg))
    if writer is not None and meta["stages_done"] == 0:
        commit(writer, cfg, meta)  # the manifest names the folder's kind
    stages = method.stages()
    blocks: list[Block] = []
    for i, net_cfg in enumerate(meta["networks"]):  # a resumed run: its finished blocks
        b = Block(rebuild_velocity(net_cfg, velocity, i)).to(device=device, dtype=dtype)
        b.load_state_dict(load_tensors(run.block(i), "out", device))  # type: ignore[union-attr]
        blocks.append(b)
    done = meta["stages_done"]
    if done > 0:
        cache = load_tensors(run.particles, "out", device)  # type: ignore[union-attr]
        cur_train, cur_val = cache["train"].to(dtype), cache["val"].to(dtype)
        if int(cache.get("stages_done", done)) != done:  # killed between particles and record
            cur_train, cur_val = replay_particles(
                method, blocks, stages[:done], norm, train_x, val_x, ctx, cond, val_cond
            )
    else:
        cur_train, cur_val = norm.normalize(train_x), norm.normalize(val_x)
    budget = StepBudget(stop_after_steps)
    for k in range(done, len(stages)):
        if meta.get("rejected") is not None:  # a resumed run whose chain ended at a dropped stage
            break
        if meta["history"] and method.should_stop(meta["history"]):
            break
        t_stage = time.perf_counter()
        stage_blocks = make_stage_blocks(
            cfg, stages[k], blocks, k, event_shape, device, dtype, velocity, data.num_classes
        )
        stage = Flow(stage_blocks, event_shape).to(device=device, dtype=dtype)
        last = k == len(stages) - 1
        record = optimize_stage(
            cfg, method, stage, cur_train, k, len(stages), run, reporter, budget, ctx, amp, cond
        )
        stage.eval()
        with stage.count_nfe() as c_val:
            new_val = push_particles(method, stage, cur_val, ctx, val_cond)
        record.update(
            {
                "stage": k,
                "blocks": stages[k],
                "movement": float((new_val - cur_val).pow(2).flatten(1).sum(1).mean()),
                "push_nfe": c_val.nfe,
                **report_stage(method, stage, cur_val, new_val, k, val_cond),
            }
        )
        rejected = method.reject_stage(record)  # from the validation figures, before the push
        new_train = (
            None if last or rejected else push_particles(method, stage, cur_train, ctx, cond)
        )
        # the stage's seconds: its optimisation before a resumption plus all of this call's work
        record["seconds"] = float(record.get("seconds_before_resume", 0.0)) + (
            time.perf_counter() - t_stage
        )
        if rejected:  # dropped: the chain ends before this stage
            meta["rejected"] = record
            meta["train_seconds"] = float(meta["train_seconds"]) + record["seconds"]
            if writer is not None:
                commit(writer, cfg, meta)
                Checkpoint(writer.path, k).clear()
            ddp.barrier(ctx)
            reporter.stage_end({**record, "rejected": True})
            break
        blocks.extend(stage_blocks)
        meta["networks"].extend(block_network_config(b) for b in stage_blocks)
        meta["stages_done"] = k + 1
        meta["history"].append(record)
        meta["train_seconds"] = float(meta["train_seconds"]) + record["seconds"]
        if writer is not None:  # commit: blocks, particles, then meta.json and manifest.json
            for j, b in zip(stages[k], stage_blocks):
                save_tensors(writer.block(j), b.state_dict())
            save_tensors(
                writer.particles,
                {
                    "train": (new_train if new_train is not None else cur_train[:0]),
                    "val": new_val,
                    "stages_done": torch.tensor(k + 1),  # which record these particles belong to
                },
            )
            commit(writer, cfg, meta)
            Checkpoint(writer.path, k).clear()
        ddp.barrier(ctx)  # no rank looks for the next stage's progress file before this commit
        reporter.stage_end(record)
        cur_val = new_val
        cur_train = new_train if new_train is not None else cur_train
    ddp.barrier(ctx)  # the run folder is complete before any rank returns
    flow = Flow(blocks, event_shape, shift=shift.cpu(), scale=scale.cpu()).to(
        device=device, dtype=dtype
    )
    flow.eval()
    return TrainResult(
        flow=flow,
        history=meta["history"],
        run_dir=run.path if run is not None else None,
        splits=data.splits(),
    )


def load_run(
    path: str | Path, *, device: str = "cpu", velocity: VelocitySource | None = None
) -> tuple[Flow, TrainConfig, dict[str, Any]]:
    """Load a run folder: ``(flow, config, meta)``. Never unpickles; mismatches raise InputError.

    Arguments:
        path: the run folder.
        device: where the flow goes.
        velocity: the module (or factory) the run was trained with; required when its blocks are
            user networks without a ``config()`` (saved as weights only), else optional.
    """
    run = RunDir(path)
    if not run.path.is_dir():
        fail("run", "must be an existing run folder", str(path))
    meta = read_meta(run, "run")  # manifest.json, or a format-1 folder's meta.json
    if meta is None:
        fail("run", "must hold a committed record (manifest.json or meta.json)", str(path))
    cfg = TrainConfig.from_json(load_json(run.config, "run"))
    if not meta["networks"]:
        fail("run", "must hold at least one trained block (is training still running?)", str(path))
    dtype, dev = DTYPES[cfg.dtype], resolve_device(device)
    custom = any(n.get("kind") not in NETWORKS.names() for n in meta["networks"])
    if velocity is None and not custom:
        source = run.manifest.name if run.manifest.exists() else run.meta.name
        flow = load_flow(
            run, meta["networks"], meta["event_shape"], dtype=dtype, device=dev, source=source
        )
        return flow, cfg, meta
    blocks = []
    for i, net_cfg in enumerate(meta["networks"]):
        b = Block(rebuild_velocity(net_cfg, velocity, i)).to(dtype)
        try:
            b.load_state_dict(load_tensors(run.block(i), "run"))
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            fail("velocity", f"must match the network of {run.block(i).name} ({first})", str(path))
        blocks.append(b)
    norm = load_tensors(run.normalization, "run")
    flow = Flow(blocks, meta["event_shape"], shift=norm["shift"], scale=norm["scale"])
    return flow.to(device=dev, dtype=dtype).eval(), cfg, meta
