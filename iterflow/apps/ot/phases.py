"""Phases of the transport and density-ratio fits on the one loop, and the run folder that resumes them.

A fit is a sequence of *phases* (the flow-matching initialisation, the classifier warm-up, the joint
refinement, the ratio classifiers), each one call of :func:`iterflow.train.optimize` with its own
checkpoint key. In a run folder (:class:`PhaseFolder`) a finished phase saves its tensors atomically
(``phases/<name>.safetensors``, with the random generator's state) and records itself in
``manifest.json``; a re-run loads finished phases instead of training them again and resumes an
interrupted one from its in-stage checkpoint, so that the result after ``kill -9`` and a re-run equals
the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from iterflow.core import distributed as ddp
from iterflow.errors import fail
from iterflow.io import MANIFEST, load_tensors, read_manifest, save_tensors, write_manifest
from iterflow.methods import Loss
from iterflow.train import Checkpoint, OptimConfig, StepBudget, optimize
from iterflow.train.loop import BatchSource

M = TypeVar("M", bound=nn.Module)

ProgressFn = Callable[[str, int, int, dict[str, float]], None]
"""``progress(phase, step, total, terms)``: called during training (the CLI draws a bar from it)."""


class PhaseReporter:
    """The loop's reporter for one named phase: forwards progress to ``progress(phase, ...)``."""

    def __init__(self, progress: ProgressFn | None, phase: str) -> None:
        self.progress, self.phase, self.total = progress, phase, 0

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        self.total = total_steps
        if self.progress is not None:
            self.progress(self.phase, done_steps, total_steps, {})

    def step(self, step: int, terms: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress(self.phase, step, self.total, terms)

    def stage_end(self, record: dict[str, Any]) -> None:
        pass


@dataclass(frozen=True)
class Runtime:
    """How a fit runs, not what it computes (none of it changes the result).

    Attributes:
        progress: ``progress(phase, step, total, terms)`` or ``None``.
        ctx: the data-parallel context (:func:`iterflow.core.distributed.setup`); rank 0 writes.
        autocast: dtype of ``torch.autocast`` around the losses (``None``: full precision).
        checkpoint_every: optimiser steps between in-phase checkpoints (in a run folder).
        budget: testing aid: raise ``KeyboardInterrupt`` after that many steps in all.
    """

    progress: ProgressFn | None = None
    ctx: ddp.DistContext | None = None
    autocast: torch.dtype | None = None
    checkpoint_every: int = 200
    budget: StepBudget = field(default_factory=lambda: StepBudget(None))

    @property
    def main(self) -> bool:
        """Whether this process writes (rank 0, or no data parallelism)."""
        return self.ctx is None or self.ctx.is_main


def seeded(build: Callable[[], M], generator: torch.Generator) -> M:
    """Build a module with its initialisation seeded from ``generator`` (global RNG untouched)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def run_phase(
    module: nn.Module,
    loss_fn: Callable[[tuple[Tensor, ...], torch.Generator], Loss],
    data: BatchSource,
    config: OptimConfig,
    *,
    generator: torch.Generator,
    label: str,
    runtime: Runtime,
    checkpoint: Checkpoint | None,
    key: int = 0,
    lr_scales: dict[str, float] | None = None,
) -> dict[str, Any]:
    """One phase on :func:`iterflow.train.optimize`, reported as ``label``; its record gets
    ``seconds`` (the optimisation's, including time before an interruption)."""
    record = optimize(
        module,
        loss_fn,
        data,
        config,
        generator=generator,
        checkpoint=checkpoint,
        reporter=PhaseReporter(runtime.progress, label),
        ctx=runtime.ctx,
        autocast=runtime.autocast,
        lr_scales=lr_scales,
        stage=key,
        budget=runtime.budget,
    )
    return {**record, "seconds": record["seconds_optimize"]}


def _json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


class PhaseFolder:
    """A run folder trained in phases (see the module docstring).

    ``manifest.json`` (kind ``kind``) holds the run's ``config`` (its identity: a folder is only
    resumed with the same one), ``phases`` (the records of the finished phases) and ``complete``.

    Arguments:
        path: the folder (created when new; a non-empty folder must be a run of ``kind``).
        kind: the folder kind written to the manifest.
        config: JSON values identifying the run.
        ctx: the data-parallel context: every rank validates, rank 0 alone writes.
        argument: the Python argument errors name.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        config: dict[str, Any],
        *,
        ctx: ddp.DistContext | None = None,
        argument: str = "folder",
    ) -> None:
        self.path, self.kind, self.config = Path(path), kind, _json(config)
        self.ctx, self.argument = ctx, argument
        self.write = ctx is None or ctx.is_main
        self.manifest = self._open()

    def _open(self) -> dict[str, Any]:
        """Validate the folder (every rank), then create it and its manifest (rank 0)."""
        if self.path.exists() and not self.path.is_dir():
            fail(self.argument, "must be a folder, not a file", str(self.path))
        if (self.path / MANIFEST).is_file():
            m = read_manifest(self.path, self.kind, self.argument)
            old = m.get("config")
            if old != self.config:
                diff = {k: (_get(old, k), v) for k, v in self.config.items() if _get(old, k) != v}
                fail(
                    self.argument,
                    f"holds a {self.kind} run with another configuration {diff}; use a new folder",
                    str(self.path),
                )
            return m
        if self.path.exists() and any(self.path.iterdir()):
            fail(
                self.argument,
                f"must be a new or empty folder, or a {self.kind} run folder to resume",
                str(self.path),
            )
        ddp.barrier(self.ctx)  # every rank has looked before rank 0 writes
        m = {"config": self.config, "phases": {}, "complete": False}
        if self.write:
            self.path.mkdir(parents=True, exist_ok=True)
            write_manifest(self.path, self.kind, **m)
        return m

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def done(self, name: str) -> bool:
        """Whether phase ``name`` has been committed."""
        return name in self.manifest.get("phases", {})

    def record(self, name: str) -> dict[str, Any]:
        return dict(self.manifest["phases"][name])

    def tensors_path(self, name: str) -> Path:
        return self.path / "phases" / f"{name}.safetensors"

    def checkpoint(self, key: int, environment: dict[str, str] | None = None) -> Checkpoint:
        """In-phase checkpoints of the phase with checkpoint key ``key`` (``environment``: what
        besides PyTorch's version decides its steps, :class:`~iterflow.train.loop.Checkpoint`)."""
        return Checkpoint(self.path, key, write=self.write, environment=environment)

    def load(self, name: str, device: torch.device | str) -> dict[str, Tensor]:
        """The tensors a finished phase committed."""
        return load_tensors(self.tensors_path(name), self.argument, device)

    def commit(
        self, name: str, key: int, tensors: dict[str, Tensor], record: dict[str, Any]
    ) -> None:
        """Save a finished phase: its tensors, then the manifest naming it, then drop its progress."""
        self.manifest.setdefault("phases", {})[name] = _json(record)
        if self.write:
            save_tensors(self.tensors_path(name), tensors)
            write_manifest(self.path, self.kind, **self._fields())
            self.checkpoint(key).clear()
        ddp.barrier(self.ctx)

    def finish(self, **fields: Any) -> None:
        """Write the final manifest (``complete``) with ``fields``; drop the phase files."""
        self.manifest.update(_json(fields))
        self.manifest["complete"] = True
        if self.write:
            write_manifest(self.path, self.kind, **self._fields())
            shutil.rmtree(self.path / "phases", ignore_errors=True)
        ddp.barrier(self.ctx)

    def _fields(self) -> dict[str, Any]:
        skip = ("kind", "format_version", "iterflow_version")
        return {k: v for k, v in self.manifest.items() if k not in skip}


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None
