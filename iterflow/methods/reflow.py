"""Reflow: flow matching on the deterministic coupling that a trained flow defines
(Liu, Gong & Liu, "Flow Straight and Fast", arXiv:2209.03003, section 2.3).

Given a source flow with noise-to-data map ``T``, draw ``Z ~ N(0, I)`` and set ``X = T(Z)`` by
simulating its ODE. One block is then trained by flow matching on the *pairs* ``(X, Z)``
(``X`` at ``s = 0``, ``Z`` at ``s = 1``, straight interpolant, no re-pairing):

.. math::
    \\min_v \\int_0^1 E\\,|v(X_s, s) - (Z - X)|^2\\, ds, \\qquad X_s = (1 - s) X + s Z .

The new flow carries ``N(0, I)`` to the same data distribution as the source (the coupling's
marginals are unchanged), its convex transport costs do not increase, and its paths are straighter;
repeating gives the k-rectified flow. In the papers' convention (noise at ``t = 0``) ``t = 1 - s``.

Pairs live in the source's *model units* (after its normalisation). The run must therefore use the
source's normalisation: the same data, ``n_train``, ``seed`` and ``standardize``, which
``iterflow reflow`` guarantees by copying them from the source's config.

Pairs are simulated once and kept (``regenerate_every = 0``, offline; written to the file ``pairs``
when one is named, and re-read from it on resume), or the whole pool is re-simulated from the source
every ``regenerate_every`` steps (online: more distinct pairs, more simulation).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.core.conditioning import conditioning
from iterflow.core.flow import Flow
from iterflow.core.guidance import LABEL_KEY
from iterflow.core.ode import SolverSpec, solver_names
from iterflow.core.rectified import (
    EVAL_LARGE,
    EVAL_LARGE_DIM,
    EVAL_POINTS,
    Pairs,
    load_pairs,
    quick_straightness,
    save_pairs,
    simulate_pairs,
)
from iterflow.core.seeds import derived_seed
from iterflow.core.store import load_trained_flow
from iterflow.errors import check_finite, check_positive, fail
from iterflow.methods.base import Loss, Method, MethodOptions
from iterflow.methods.fm import FMOptions, flow_matching_loss


@dataclass(frozen=True)
class PairedOptions(MethodOptions):
    """Options of methods trained on (data, noise) pairs simulated from a source flow.

    Attributes:
        source: run folder of the source flow (simulated for the pairs; warm start).
        pairs: safetensors file of the pairs: read if it exists, else simulated from ``source`` and
            written there ('' keeps them in memory only).
        n_pairs: number of pairs in the pool.
        pair_solver, pair_steps: solver that simulates the source (fixed-step solvers use
            ``pair_steps`` steps per block).
        regenerate_every: re-simulate the whole pool every this many optimiser steps (0: offline).
        warm_start: start from the source's weights (its single block must have the same network).
        pair_guidance: classifier-free guidance weight of the source's decoding in a run with
            class labels (:mod:`iterflow.core.guidance`; 1: the conditional field): distils or
            straightens the guided sampler.
    """

    source: str = ""
    pairs: str = ""
    n_pairs: int = 20_000
    pair_solver: str = "rk4"
    pair_steps: int = 32
    regenerate_every: int = 0
    warm_start: bool = True
    pair_guidance: float = 1.0

    def __post_init__(self) -> None:
        check_positive(self.n_pairs, "option 'n_pairs'", integer=True)
        check_finite(self.pair_guidance, "option 'pair_guidance'")
        check_positive(self.pair_steps, "option 'pair_steps'", integer=True)
        check_positive(
            self.regenerate_every, "option 'regenerate_every'", integer=True, allow_zero=True
        )
        if self.pair_solver not in solver_names():
            fail("option 'pair_solver'", f"must be one of {solver_names()}", self.pair_solver)

    def pair_spec(self) -> SolverSpec:
        return SolverSpec(self.pair_solver, self.pair_steps)

    def pair_info(self) -> dict[str, str]:
        """Metadata stored with the pairs (a file made with other settings is refused)."""
        return {
            "source": self.source,
            "n_pairs": str(self.n_pairs),
            "pair_solver": self.pair_solver,
            "pair_steps": str(self.pair_steps),
            "pair_guidance": str(self.pair_guidance),
        }


def _network_config(net: torch.nn.Module) -> dict[str, Any] | None:
    """The recorded ``config()`` of a velocity network (``None`` for modules without one)."""
    config = getattr(net, "config", None)
    return config() if callable(config) else None


class PairedMethod(Method):
    """Base of one-block methods trained on pairs simulated from a source flow (reflow, distill).

    :meth:`stage_data` returns ``(data, noise)``, so the trainer samples both ends of a pair with
    the same row indices; it also warm-starts the block from the source. With
    ``regenerate_every > 0``, :meth:`refresh` overwrites the pool in place (the trainer keeps
    indexing the same tensors).

    Class labels (a run conditioned on ``y``, :meth:`conditioned_stage_data`): each pair gets a
    label drawn from the training rows' labels (with the pairs' seed) and is decoded by the
    label-conditional source under it (guided by ``pair_guidance``); the labels stay with the pairs
    (in the pool, in the pairs file and in every regenerated pool) and are the conditioning rows of
    the minibatches.
    """

    Options = PairedOptions
    progressive = False
    max_blocks = 1

    def __init__(
        self, options: MethodOptions, *, event_shape: tuple[int, ...], num_blocks: int
    ) -> None:
        super().__init__(options, event_shape=event_shape, num_blocks=num_blocks)
        self._source: Flow | None = None
        self._pool: Pairs | None = None
        self._calls = 0
        self._seed = 0
        self._row_labels: Tensor | None = None  # the training rows' labels (a conditioned run)

    # -- data -----------------------------------------------------------------------------------
    def conditioned_stage_data(
        self,
        stage: Flow,
        particles: Tensor,
        index: int,
        generator: torch.Generator,
        cond: Mapping[str, Tensor],
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """The labelled pool ``(data, noise)`` and its labels (class docstring)."""
        if set(cond) != {LABEL_KEY}:
            fail(
                "cond",
                f"method {self.name!r} is conditioned on class labels 'y' only",
                sorted(cond),
            )
        self._row_labels = cond[LABEL_KEY]
        data = self.stage_data(stage, particles, index, generator)
        if self._pool is None or self._pool.labels is None:
            raise RuntimeError("stage_data must build a labelled pool in a conditioned run")
        return data, {LABEL_KEY: self._pool.labels}

    def stage_data(
        self, stage: Flow, particles: Tensor, index: int, generator: torch.Generator
    ) -> tuple[Tensor, ...]:
        opts: PairedOptions = self.options  # type: ignore[assignment]
        if not opts.source and not opts.pairs:
            fail(
                "option 'source'",
                f"method {self.name!r} needs a source run folder or a pairs file",
                "",
            )
        # the noise of the pairs: reproducible per run and source, independent of the step stream
        self._seed = derived_seed(generator.initial_seed(), opts.source, "pairs")
        like = particles
        if opts.warm_start or opts.regenerate_every > 0 or not self._pairs_file_ready():
            self._source = self._load_source(like)
        if opts.warm_start:
            self._warm_start(stage)
        pairs = self._initial_pairs(like)
        labels = None if pairs.labels is None else pairs.labels.to(like.device, torch.long)
        self._pool = Pairs(
            data=pairs.data.to(like).contiguous(),
            noise=pairs.noise.to(like).contiguous(),
            labels=labels if self._row_labels is not None else None,
        )
        return (self._pool.data, self._pool.noise)

    def _pairs_file_ready(self) -> bool:
        opts: PairedOptions = self.options  # type: ignore[assignment]
        return bool(opts.pairs) and Path(opts.pairs).is_file()

    def _load_source(self, like: Tensor) -> Flow:
        opts: PairedOptions = self.options  # type: ignore[assignment]
        if not opts.source:
            fail(
                "option 'source'",
                "must name the source run folder (needed for warm start or new pairs)",
                opts.source,
            )
        flow = load_trained_flow(opts.source, device=like.device)
        if flow.event_shape != self.event_shape:
            fail(
                "option 'source'",
                f"must be a flow on data of shape {self.event_shape}",
                flow.event_shape,
            )
        flow = flow.to(like.dtype)
        flow.eval()
        for p in flow.parameters():
            p.requires_grad_(False)
        return flow

    def _warm_start(self, stage: Flow) -> None:
        src, opts = self._source, self.options
        source_name = getattr(opts, "source", "")
        if src is None:  # stage_data loads the source whenever warm_start is set
            raise RuntimeError("warm start needs the source flow loaded")
        net = stage.chain[0].velocity
        mine, theirs = _network_config(net), _network_config(src.chain[0].velocity)
        if src.num_blocks != 1 or mine != theirs:
            fail(
                "option 'warm_start'",
                "needs a one-block source with the same network as this run (source: "
                f"{src.num_blocks} block(s), {theirs}; run: {mine}); pass -o warm_start=false",
                source_name,
            )
        with torch.no_grad():
            net.load_state_dict(src.chain[0].velocity.state_dict())

    def _initial_pairs(self, like: Tensor) -> Pairs:
        opts: PairedOptions = self.options  # type: ignore[assignment]
        if self._pairs_file_ready():
            pairs, info = load_pairs(opts.pairs, "option 'pairs'")
            if tuple(pairs.data.shape[1:]) != self.event_shape:
                fail(
                    "option 'pairs'",
                    f"must hold pairs of shape (n, {self.event_shape})",
                    tuple(pairs.data.shape),
                )
            stale = {
                k: (info.get(k), v)
                for k, v in opts.pair_info().items()
                if k in info and info[k] != v
            }
            if stale:
                fail(
                    "option 'pairs'",
                    f"was made with other settings {stale}; use a new file",
                    opts.pairs,
                )
            if self._row_labels is not None and pairs.labels is None:
                fail("option 'pairs'", "must hold labelled pairs for a run with labels", opts.pairs)
            return pairs
        pairs = self._simulate(0, like)
        if opts.pairs:
            save_pairs(opts.pairs, pairs, opts.pair_info())
        return pairs

    def _simulate(self, round_: int, like: Tensor) -> Pairs:
        opts: PairedOptions = self.options  # type: ignore[assignment]
        if self._source is None:
            fail(
                "option 'source'", "must name the source run folder to simulate pairs", opts.source
            )
        gen = torch.Generator(device=like.device).manual_seed(derived_seed(self._seed, round_))
        labels = self._pair_labels(like)
        if labels is not None and self._source.num_classes < int(labels.max()) + 1:
            fail(
                "option 'source'",
                "must be a label-conditional run with the classes of this run's labels "
                f"({int(labels.max()) + 1})",
                f"{opts.source} ({self._source.num_classes} classes)",
            )
        return simulate_pairs(
            self._source,
            opts.n_pairs,
            spec=opts.pair_spec(),
            generator=gen,
            labels=labels,
            guidance_weight=opts.pair_guidance,
        )

    def _pair_labels(self, like: Tensor) -> Tensor | None:
        """The pool's labels: kept once drawn; first drawn from the training rows' labels with the
        pairs' seed (``None`` in a run without labels)."""
        if self._row_labels is None:
            return None
        if self._pool is not None and self._pool.labels is not None:
            return self._pool.labels
        opts: PairedOptions = self.options  # type: ignore[assignment]
        gen = torch.Generator().manual_seed(derived_seed(self._seed, "labels"))
        rows = torch.randint(0, self._row_labels.shape[0], (opts.n_pairs,), generator=gen)
        return self._row_labels[rows.to(self._row_labels.device)].to(like.device, torch.long)

    def start_at(self, step: int) -> None:
        """Restore the step count and the pool of the round that ``step`` falls in (a resume)."""
        opts: PairedOptions = self.options  # type: ignore[assignment]
        self._calls = step
        if opts.regenerate_every > 0 and self._pool is not None and step >= opts.regenerate_every:
            new = self._simulate(step // opts.regenerate_every, self._pool.data)
            self._pool.data.copy_(new.data)
            self._pool.noise.copy_(new.noise)

    def refresh(self) -> None:
        """Count a training step; every ``regenerate_every`` steps re-simulate the pool in place."""
        opts: PairedOptions = self.options  # type: ignore[assignment]
        self._calls += 1
        if (
            opts.regenerate_every > 0
            and self._pool is not None
            and self._calls % opts.regenerate_every == 0
        ):
            new = self._simulate(self._calls // opts.regenerate_every, self._pool.data)
            self._pool.data.copy_(new.data)
            self._pool.noise.copy_(new.noise)

    # -- reports --------------------------------------------------------------------------------
    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        """Straightness and transport cost of the trained block (model units, ``eval``'s budget)."""
        with self.pool_labels(EVAL_POINTS if stage.dim <= EVAL_LARGE_DIM else EVAL_LARGE[0]):
            res = quick_straightness(stage, derived_seed(self._seed, "report"))
        return {"straightness": res.straightness, "transport_cost": res.transport_cost}

    def pool_labels(self, n: int) -> AbstractContextManager[None]:
        """Bind ``n`` labels of a labelled pool, its first ones (cycled when the pool is smaller),
        for the reports' ``n`` rows; nothing without labels."""
        if self._pool is None or self._pool.labels is None:
            return nullcontext()
        labels = self._pool.labels
        return conditioning(
            **{LABEL_KEY: labels[torch.arange(n, device=labels.device) % len(labels)]}
        )


@dataclass(frozen=True)
class ReflowOptions(PairedOptions):
    """Options of reflow.

    Attributes:
        sigma: standard deviation of Gaussian noise added around the straight path (0: none).
    """

    sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.sigma, "option 'sigma'", allow_zero=True)


class Reflow(PairedMethod):
    """Reflow: one-block flow matching on (data, noise) pairs simulated from a source flow."""

    name = "reflow"
    Options = ReflowOptions

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        self.refresh()
        data, noise = batch
        fm = FMOptions(interpolant="straight", coupling="independent", sigma=self.options.sigma)  # type: ignore[attr-defined]
        return flow_matching_loss(stage.blocks[0], data, noise, fm, generator)  # type: ignore[arg-type]
