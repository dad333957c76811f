"""One stage of the trainer: its blocks, their optimisation, and the particles pushed through them.

:func:`iterflow.train.progressive.train_tensors` runs, for stage ``k``, :func:`make_stage_blocks`
(fresh blocks seeded from ``(seed, k)``, warm-started from the last finished one),
:func:`optimize_stage` (the method's loss on the one loop, :func:`iterflow.train.loop.optimize`,
with the conditioning rows bound around it), then :func:`push_particles` (the training and
validation particles through the trained blocks, sharded under data parallelism) and
:func:`report_stage` (the method's figures on the validation particles). :func:`replay_particles`
pushes the data again through committed stages when a kill fell between the particle cache and the
commit record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from iterflow.core import distributed as ddp
from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Block, Flow
from iterflow.core.guidance import LABEL_KEY
from iterflow.errors import fail
from iterflow.io import RunDir
from iterflow.methods import Loss, Method
from iterflow.train.config import TrainConfig, build_velocity, stage_seed
from iterflow.train.inputs import VelocitySource, new_velocity
from iterflow.train.loop import Checkpoint, Reporter, StepBudget, optimize

__all__ = [
    "COND_REPORT_ROWS",
    "PUSH_CHUNK",
    "cond_to_device",
    "drop_labels",
    "make_stage_blocks",
    "optimize_stage",
    "push_particles",
    "replay_particles",
    "report_stage",
    "training_view",
]

#: Most validation rows a conditioned stage report integrates in one call (the reports of the
#: likelihood methods integrate chunks of 4096 rows; bound conditioning must match each call).
COND_REPORT_ROWS = 4096
#: Rows per ``method.push`` call in a conditioned run (within the methods' own push chunk, 8192).
PUSH_CHUNK = 8192


def replay_particles(
    method: Method,
    blocks: list[Block],
    stages: list[list[int]],
    norm: Flow,
    train_x: Tensor,
    val_x: Tensor,
    ctx: ddp.DistContext | None,
    cond: dict[str, Tensor],
    val_cond: dict[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """The training and validation particles after the committed ``stages``, pushed again from the
    data: needed only when a kill fell between writing the particle cache and the commit record."""
    x, v = norm.normalize(train_x), norm.normalize(val_x)
    for indices in stages:
        stage = Flow([blocks[i] for i in indices], tuple(x.shape[1:])).to(x.device, x.dtype).eval()
        x, v = (
            push_particles(method, stage, x, ctx, cond),
            push_particles(method, stage, v, ctx, val_cond),
        )
    return x, v


def cond_to_device(
    cond: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Conditioning tensors on ``device``; floating ones in the run's ``dtype`` (labels keep theirs)."""
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in cond.items()
    }


def report_stage(
    method: Method,
    stage: Flow,
    before: Tensor,
    after: Tensor,
    k: int,
    val_cond: dict[str, Tensor],
) -> dict[str, float]:
    """``method.stage_report`` on the validation particles (at most :data:`COND_REPORT_ROWS` of
    them, with their conditioning bound, in a conditioned run)."""
    if not val_cond:
        return method.stage_report(stage, before, after, k)
    n = min(before.shape[0], COND_REPORT_ROWS)
    with conditioning(**{name: v[:n] for name, v in val_cond.items()}):
        return method.stage_report(stage, before[:n], after[:n], k)


def push_particles(
    method: Method,
    stage: Flow,
    x: Tensor,
    ctx: ddp.DistContext | None,
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """``method.push`` of the particles ``x``; under data parallelism each rank pushes its shard of
    rows and the shards are all-gathered (pushes are row by row: fixed-step solvers). With
    conditioning, rows are pushed in chunks of :data:`PUSH_CHUNK`, each with its rows of ``cond``."""
    n = x.shape[0]
    lo, hi = (0, n) if ctx is None else ctx.bounds(n)
    if not cond:
        out = method.push(stage, x[lo:hi] if ctx is not None else x)
    else:
        parts = []
        for a in range(lo, hi, PUSH_CHUNK):
            b = min(hi, a + PUSH_CHUNK)
            with conditioning(**{name: v[a:b] for name, v in cond.items()}):
                parts.append(method.push(stage, x[a:b]))
        out = torch.cat(parts) if parts else x[lo:hi]
    return out if ctx is None else ddp.all_gather_rows(out, n, ctx)


def optimize_stage(
    cfg: TrainConfig,
    method: Method,
    stage: Flow,
    particles: Tensor,
    k: int,
    n_stages: int,
    run: RunDir | None,
    reporter: Reporter,
    budget: StepBudget,
    ctx: ddp.DistContext | None,
    amp: torch.dtype | None,
    cond: dict[str, Tensor],
) -> dict[str, Any]:
    """Optimise the blocks of stage ``k`` on the one loop (:func:`iterflow.train.loop.optimize`).

    Conditioning rows are drawn with the rows of the method's tensors (the loop draws the same rows
    of every tensor of the batch source; :meth:`~iterflow.methods.Method.conditioned_stage_data`)
    and bound around the method's loss; class labels ``y`` of a label-conditional stage first go
    through label dropout (:func:`drop_labels`, probability ``cfg.label_dropout``)."""
    gen = torch.Generator(device=particles.device).manual_seed(stage_seed(cfg.seed, k, salt=2))
    if cond:
        data, cond = method.conditioned_stage_data(stage, particles, k, gen, cond)
    else:
        data = method.stage_data(stage, particles, k, gen)
    view = training_view(stage, cfg)
    names, m = list(cond), 0
    if cond:  # conditioning rows are drawn with the rows of the method's tensors
        if callable(data):
            fail("cond", f"needs minibatches of rows; method {method.name!r} draws its own", names)
        m = len(data)
        data = (*data, *cond.values())
    null = stage.num_classes  # the null label of a label-conditional stage (0: none)

    def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
        if not names:
            return method.loss(view, batch, k, generator)
        rows = dict(zip(names, batch[m:]))
        if null and LABEL_KEY in rows and cfg.label_dropout > 0:
            rows[LABEL_KEY] = drop_labels(rows[LABEL_KEY], cfg.label_dropout, null, generator)
        with conditioning(**rows):
            return method.loss(view, batch[:m], k, generator)

    return optimize(
        stage,
        loss_fn,
        data,
        cfg.optim_config(),
        generator=gen,
        checkpoint=Checkpoint(
            run.path, k, write=ctx is None or ctx.is_main, environment=method.environment()
        )
        if run
        else None,
        reporter=reporter,
        ctx=ctx,
        autocast=amp,
        stage=k,
        n_stages=n_stages,
        budget=budget,
        on_start=method.start_at,
    )


def drop_labels(y: Tensor, p: float, null: int, generator: torch.Generator) -> Tensor:
    """Label dropout: each label of ``y`` ``(B,)`` replaced by the null label ``null`` with
    probability ``p`` (one uniform draw per row from ``generator``; the global batch's rows, so
    data-parallel ranks agree). The network then learns ``v(x, s | null)``, the unconditional
    field of classifier-free guidance (Ho & Salimans, arXiv 2207.12598)."""
    u = torch.rand(y.shape[0], generator=generator, device=generator.device)
    return torch.where(u.to(y.device) < p, torch.full_like(y, null), y)


def training_view(stage: Flow, cfg: TrainConfig) -> Flow:
    """The stage as the loss drives it: each velocity network through ``torch.compile`` when
    ``cfg.compile``, its one-pass Jacobian terms included (:meth:`Flow.compiled`; sharing its
    parameters with ``stage``, which is what gets saved)."""
    return stage.compiled() if cfg.compile else stage


def make_stage_blocks(
    cfg: TrainConfig,
    indices: list[int],
    previous: list[Block],
    k: int,
    event_shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    velocity: VelocitySource | None = None,
    num_classes: int = 0,
) -> list[Block]:
    """Fresh blocks ``indices`` of stage ``k``, seeded per block; a single block warm-starts from the
    last finished one (``cfg.warm_start``) when their architectures agree. Built-in networks are
    label-conditional with ``num_classes > 0``."""
    out = []
    for j in indices:
        seed = stage_seed(cfg.seed, j, salt=1)
        if velocity is None:
            net = build_velocity(cfg, event_shape, seed, num_classes)
        else:
            net = new_velocity(velocity, seed)
        if cfg.warm_start and previous and len(indices) == 1:
            try:
                net.load_state_dict(previous[-1].velocity.state_dict())
            except RuntimeError:
                pass  # architectures differ (e.g. a custom last block): keep the fresh init
        out.append(Block(net).to(device=device, dtype=dtype))
    return out
