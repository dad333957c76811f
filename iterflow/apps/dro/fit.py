"""Fitting the worst-case map: the objective of :mod:`iterflow.methods.worst_case` trained on the one
loop (:func:`iterflow.train.loop.optimize`), one phase per optimisation (the whole map for the
``joint`` schedule, one block at a time for ``progressive``), resumable in a run folder and
data-parallel under ``torchrun``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from iterflow.apps.dro.config import DROConfig
from iterflow.apps.dro.data import check_label_range, check_labels, check_points
from iterflow.apps.dro.map import WorstCaseMap, WorstCaseResult, assess
from iterflow.apps.dro.reference import load_reference
from iterflow.apps.dro.risks import ClassifierLoss, Risk, risk_values, uses_labels
from iterflow.apps.dro.store import WorstCaseFolder
from iterflow.core import distributed as ddp
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import build_network
from iterflow.errors import fail
from iterflow.io import load_tensors
from iterflow.methods.base import Loss
from iterflow.methods.worst_case import push, worst_case_loss
from iterflow.train.config import DTYPES, resolve_device, stage_seed, standardization
from iterflow.train.loop import Checkpoint, Reporter, StepBudget, optimize

#: ``progress(step, total_steps, terms)``: the older progress callback of :func:`fit_worst_case`.
Progress = Callable[[int, int, dict[str, float]], None]


def _resolve_risk_and_labels(
    reference: Tensor | str | os.PathLike[str], risk: Any, labels: Tensor | None, n: int, seed: int
) -> tuple[Tensor, Risk | ClassifierLoss, Tensor | None]:
    if labels is not None and not uses_labels(risk):
        if not isinstance(risk, nn.Module):
            fail(
                "labels",
                "are only used with a classifier risk (a ClassifierLoss or a logits module) or "
                "another label-dependent risk",
                type(risk).__name__,
            )
        risk = ClassifierLoss(risk)  # a classifier given with labels: its loss is the risk
    if not callable(risk):
        fail(
            "risk",
            "must be a callable R(y) -> (B,), a ClassifierLoss or a classifier with labels",
            type(risk).__name__,
        )
    if isinstance(reference, Tensor):
        x = reference
    else:
        ref = load_reference(reference, n_train=n, n_test=1, seed=seed)
        x = ref.train
        if labels is None and isinstance(risk, ClassifierLoss):
            labels = ref.train_labels
    check_points(x, "reference")
    if isinstance(risk, ClassifierLoss) and labels is None:
        labels = risk.predict(x)  # no labels known: attack the classifier's own predictions
    if uses_labels(risk) and labels is None:
        fail("labels", "are required by a label-dependent risk", type(risk).__name__)
    if labels is not None:
        check_labels(x, labels)
        labels = labels.to(x.device)
    return x, risk, labels


def _num_classes(risk: Any, x: Tensor, labels: Tensor | None) -> int:
    """Classes of a label-dependent risk: the classifier's logits, a ``classes`` attribute, or the
    largest label + 1."""
    if isinstance(risk, ClassifierLoss):
        with torch.no_grad():
            k = int(risk.classifier(x[:1]).shape[1])
    else:
        k = int(getattr(risk, "classes", 0)) or (0 if labels is None else int(labels.max()) + 1)
    if labels is not None:
        check_label_range(labels, k, f"must lie in [0, {k}) (the risk's classes)")
    return k


def _new_flow(x: Tensor, config: DROConfig, num_classes: int = 0) -> Flow:
    d = x.shape[1]
    xd = x.detach().cpu().double()
    shift, scale = standardization(xd, config.standardize)
    # (near-)constant coordinates keep the overall scale: dividing by a ~0 std would blow up new
    # points that vary there (e.g. border pixels of digits that are blank in every training image)
    overall = float(xd.std()) if xd.numel() > 1 else 1.0
    scale = torch.where(scale < 1e-3 * overall, torch.full_like(scale, max(overall, 1e-6)), scale)
    net_cfg = {
        "kind": "mlp",
        "dim": d,
        "hidden": list(config.hidden),
        "activation": config.activation,
        "time_freqs": config.time_freqs,
        "zero_init": True,
    }
    if num_classes > 0:
        net_cfg["num_classes"] = num_classes
    blocks = []
    for k in range(config.blocks):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stage_seed(config.seed, k, salt=71))
            blocks.append(Block(build_network(net_cfg)))
    flow = Flow(blocks, (d,), shift=shift, scale=scale)
    return flow.to(device=x.device, dtype=DTYPES[config.dtype])


def fit_worst_case(
    reference: Tensor | str | os.PathLike[str],
    risk: Risk | ClassifierLoss | nn.Module,
    *,
    labels: Tensor | None = None,
    config: DROConfig | None = None,
    n: int = 2000,
    progress: Progress | None = None,
    folder: str | Path | None = None,
    reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> WorstCaseResult:
    """Learn the worst-case map ``F`` maximising ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)``.

    Arguments:
        reference: samples of ``P``, ``(n, d)``; or a data-set name / run folder, from which ``n``
            training samples are drawn (see :func:`~iterflow.apps.dro.reference.load_reference`).
        risk: ``R``: a differentiable callable ``(B, d) -> (B,)``; a :class:`ClassifierLoss`; or a
            classifier module returning logits together with ``labels`` (its cross-entropy is the
            risk). For a classifier without labels, the labels of a labelled reference set are used,
            else the classifier's own predictions on the reference points.
        labels: ``(n,)`` labels of the reference points (classifier and other label-dependent risks).
            With ``config.condition="auto"`` the map is then conditioned on them, and applying it
            needs labels too: ``result.map(x, labels=...)``.
        config: options (:class:`DROConfig`); ``config.dtype`` sets the map's precision (the risk
            must accept it), ``config.device`` its device (default: the reference's).
        progress: called as ``progress(step, total_steps, terms)`` every ``log_every`` steps.
        folder: run folder (see :mod:`iterflow.apps.dro.store`; ``None``: nothing written). Each
            phase checkpoints there; finished phases are recorded and a later call with the same
            config on the same reference resumes (after ``kill -9`` too) to the same map, or, when
            the map is finished, loads it.
        reporter: progress of each phase (:class:`~iterflow.train.loop.Reporter`; default silent).
        stop_after_steps: testing aid: raise ``KeyboardInterrupt`` after this many optimiser steps.

    Returns:
        :class:`WorstCaseResult` with the map, the training assessment and the loss history.

    Under ``torchrun`` every rank computes its share of each minibatch and rank 0 alone writes.
    """
    config = DROConfig() if config is None else config
    x, risk, labels = _resolve_risk_and_labels(reference, risk, labels, n, config.seed)
    device = x.device if config.device is None else resolve_device(config.device)
    ctx = ddp.setup(device)
    if ctx is not None and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank)  # one GPU per process
    main = ctx is None or ctx.is_main
    x = x.to(device=device, dtype=DTYPES[config.dtype])
    labels = None if labels is None else labels.to(device)
    conditioned = config.condition == "auto" and labels is not None and uses_labels(risk)
    flow = _new_flow(x, config, _num_classes(risk, x, labels) if conditioned else 0)
    store = None if folder is None else WorstCaseFolder(folder, write=main)
    done, history, seconds = 0, [], 0.0
    if store is not None:
        store.open(config, ctx=ctx)
        digest = _digest(x, labels)
        if "reference_digest" not in store.record:
            store.commit(reference_digest=digest)  # before any phase writes into the folder
        elif store.record["reference_digest"] != digest:
            fail("folder", "holds a worst-case run fitted to other reference points or labels; "
                 "use a new folder", str(store.path))  # fmt: skip
        done = int(store.phase("map").get("blocks_done", 0))
        history, seconds = (
            list(store.record.get("history", [])),
            float(store.record.get("seconds", 0.0)),
        )
        for i in range(done):
            flow.blocks[i].load_state_dict(load_tensors(store.run.block(i), "folder", device))
        ddp.barrier(ctx)  # every rank has read the folder before rank 0 writes into it
    joint = config.schedule == "joint"
    phases = [list(range(config.blocks))] if joint else [[k] for k in range(config.blocks)]
    gamma = config.gamma if joint else config.gamma / config.blocks
    budget = StepBudget(stop_after_steps)
    pushed = x
    for p, idx in enumerate(phases):
        blocks = [flow.blocks[i] for i in idx]
        if idx[-1] >= done:
            rows, record = _train_phase(flow, blocks, pushed, labels, risk, gamma, config, p,
                                        len(phases), store, reporter, progress, budget, ctx)  # fmt: skip
            history += rows
            seconds += record["seconds_optimize"]  # including the time before an interruption
            if store is not None:  # commit: the blocks, then the record; then drop the progress
                nets = store.save_blocks(flow, idx)
                store.commit("map", {"blocks_done": idx[-1] + 1}, history=history,
                             seconds=seconds, event_shape=[x.shape[1]],
                             networks=nets[: idx[-1] + 1])  # fmt: skip
                Checkpoint(store.path, _key(config, p), write=main).clear()
                ddp.barrier(ctx)
        if p + 1 < len(phases):  # progressive: the next block starts where this one ends
            with torch.no_grad():
                pushed = push(flow, pushed, config.spec, blocks=blocks, labels=labels)[0]
    flow.eval()
    wc_map = WorstCaseMap(flow, config.spec)
    with torch.no_grad():
        train = assess(x, wc_map(x, labels), risk, labels, config.gamma)
    if store is not None and not store.phase("map").get("done"):
        store.commit("map", {"blocks_done": config.blocks, "done": True}, train=train.to_json())
        ddp.barrier(ctx)
    return WorstCaseResult(wc_map, config, train, history, seconds)


def _key(config: DROConfig, phase: int) -> str:
    """Checkpoint key of a phase: ``map`` (joint) or ``map.K`` (block ``K`` of a progressive chain)."""
    return "map" if config.schedule == "joint" else f"map.{phase}"


def _digest(x: Tensor, labels: Tensor | None) -> dict[str, Any]:
    """Shape and hash of the reference points (and labels) a folder's map is fitted to."""
    h = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return {"n": int(x.shape[0]), "dim": int(x.shape[1]), "sha256": h.hexdigest()[:16]}


class _PhaseReporter:
    """The loop's reporter of one phase: keeps the step (for the ``gamma`` warm-up), records the
    history rows and forwards progress to the caller's reporter and callback."""

    def __init__(self, config: DROConfig, phase: int, n_phases: int, gamma: float,
                 checkpoint: Checkpoint | None, reporter: Reporter | None,
                 progress: Progress | None) -> None:  # fmt: skip
        self.config, self.phase, self.n_phases, self.gamma = config, phase, n_phases, gamma
        self.checkpoint, self.reporter, self.progress = checkpoint, reporter, progress
        self.clock = 0
        self.rows: list[dict[str, Any]] = []

    def gamma_at(self, step: int) -> float:
        """The Lagrange parameter of (0-based) optimiser ``step``."""
        return self.config.options.gamma_at(step, self.config.steps, self.gamma)

    def tick(self) -> float:
        """The Lagrange parameter of the step being taken (the loop evaluates one loss per step)."""
        self.clock += 1
        return self.gamma_at(self.clock - 1)

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        self.clock = done_steps
        if self.checkpoint is not None and done_steps > 0:  # rows logged before an interruption
            key = self.checkpoint.key
            for r in self.checkpoint.read_log():
                if r.get("stage") == key and r.get("step", 0) <= done_steps:
                    self._record(int(r["step"]), r)
        if self.reporter is not None:
            self.reporter.stage_start(index, n_stages, total_steps, done_steps)

    def step(self, step: int, terms: dict[str, float]) -> None:
        shown = self._record(step, terms)
        if self.reporter is not None:
            self.reporter.step(step, shown)
        if self.progress is not None:
            self.progress(self.phase * self.config.steps + step, self.config.total_steps, shown)

    def stage_end(self, record: dict[str, Any]) -> None:
        if self.reporter is not None:
            self.reporter.stage_end(record)

    def _record(self, step: int, terms: dict[str, Any]) -> dict[str, float]:
        names = ("loss", "risk", "cost", "kinetic_excess")
        shown = {"gamma": self.gamma_at(step - 1), **{k: float(terms[k]) for k in names}}
        self.rows.append({"block": self.phase, "step": step, **shown})
        return shown


def _train_phase(
    flow: Flow,
    blocks: list[nn.Module],
    x: Tensor,
    labels: Tensor | None,
    risk: Risk | ClassifierLoss,
    gamma: float,
    config: DROConfig,
    phase: int,
    n_phases: int,
    store: WorstCaseFolder | None,
    reporter: Reporter | None,
    progress: Progress | None,
    budget: StepBudget,
    ctx: ddp.DistContext | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Optimise ``blocks`` on ``x`` (already pushed through the blocks before them); return the
    phase's history rows (those logged before an interruption too) and the loop's record."""
    write = ctx is None or ctx.is_main
    checkpoint = None if store is None else Checkpoint(store.path, _key(config, phase), write=write)
    rep = _PhaseReporter(config, phase, n_phases, gamma, checkpoint, reporter, progress)
    options = config.options

    def risk_fn(y: Tensor, lab: Tensor | None) -> Tensor:
        return risk_values(risk, y, lab)

    def loss_fn(batch: tuple[Tensor, ...], generator: torch.Generator) -> Loss:
        lab = batch[1] if len(batch) > 1 else None
        return worst_case_loss(flow, blocks, batch[0], lab, risk_fn, rep.tick(), options)

    gen = torch.Generator(device=x.device).manual_seed(stage_seed(config.seed, phase, salt=72))
    record = optimize(
        nn.ModuleList(blocks),
        loss_fn,
        (x,) if labels is None else (x, labels),
        config.optim_config(),
        generator=gen,
        checkpoint=checkpoint,
        reporter=rep,
        ctx=ctx,
        autocast=config.autocast_dtype(),
        stage=phase,
        n_stages=n_phases,
        budget=budget,
    )
    indices = list(range(config.blocks)) if config.schedule == "joint" else [phase]
    rep.stage_end({**record, "blocks": indices})
    return rep.rows, record
