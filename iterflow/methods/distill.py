"""Distillation of a flow into a k-step Euler sampler (Liu, Gong & Liu, arXiv:2209.03003,
section 2.3 "distillation"; Salimans & Ho, arXiv:2202.00512, for the k-step view).

The source flow's noise-to-data map ``T`` is simulated into pairs ``(X = T(Z), Z)`` (as in
:mod:`iterflow.methods.reflow`). One block is trained so that ``k`` Euler steps of its velocity,
decoding from ``s = 1`` to ``s = 0``, reproduce the map:

.. math::
    \\Phi_k(z) = x_0, \\quad x_k = z, \\quad x_{j-1} = x_j - \\tfrac{1}{k} v(x_j, j/k), \\qquad
    \\min_v E\\,|\\Phi_k(Z) - X|^2 + \\lambda\\, \\int_0^1 E\\,|v(X_s, s) - (Z - X)|^2 ds .

The second term (weight ``fm_weight``) is the reflow loss on the same pairs: it keeps ``v`` a sound
velocity between the Euler grid times, so the distilled run is an ordinary one-block flow that every
solver can integrate (and ``iterflow eval`` can score), while ``--solver euler --steps k`` gives the
distilled k-step sampler. For ``k = 1`` both terms ask the same of ``v(., 1)``: ``v(Z, 1) = Z - X``.
The network is the run's ordinary MLP, so :func:`iterflow.train.load_run` needs nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from iterflow.core.distributed import local_rows
from iterflow.core.flow import Block, Flow
from iterflow.errors import check_positive
from iterflow.methods.base import Loss
from iterflow.methods.fm import FMOptions, flow_matching_loss
from iterflow.methods.reflow import PairedMethod, PairedOptions


@dataclass(frozen=True)
class DistillOptions(PairedOptions):
    """Options of distillation.

    Attributes:
        k_steps: Euler steps of the distilled sampler (1: a one-step generator).
        fm_weight: weight of the flow-matching term on the same pairs (0: endpoint loss only).
    """

    k_steps: int = 1
    fm_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self.k_steps, "option 'k_steps'", integer=True)
        check_positive(self.fm_weight, "option 'fm_weight'", allow_zero=True)


def euler_decode(block: Block, z: Tensor, k: int) -> Tensor:
    """``k`` Euler steps of ``block`` from ``s = 1`` to ``s = 0`` (differentiable)."""
    x = z
    for j in range(k, 0, -1):
        s = torch.full((x.shape[0],), j / k, dtype=x.dtype, device=x.device)
        x = x - block(x, s) / k
    return x


class Distill(PairedMethod):
    """Distillation: one block whose k Euler steps reproduce a source flow's noise-to-data map."""

    name = "distill"
    Options = DistillOptions

    def loss(
        self, stage: Flow, batch: tuple[Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        self.refresh()
        opts: DistillOptions = self.options  # type: ignore[assignment]
        data, noise = batch
        block: Block = stage.blocks[0]  # type: ignore[assignment]
        n = data.shape[0]
        if opts.fm_weight > 0:  # draws from the generator for the whole batch first
            fm = flow_matching_loss(
                block, data, noise, FMOptions(coupling="independent"), generator
            )
        rows = local_rows(n)
        endpoint = (euler_decode(block, noise[rows], opts.k_steps) - data[rows]).pow(2)
        loss = Loss(endpoint.flatten(1).mean(1), n)
        loss.terms["distill"] = loss.rows.detach()
        return loss + fm.scaled(opts.fm_weight) if opts.fm_weight > 0 else loss

    def stage_report(
        self, stage: Flow, before: Tensor, after: Tensor, index: int
    ) -> dict[str, float]:
        """Straightness, transport cost and the k-step endpoint error on (up to) 2000 pool pairs."""
        out = super().stage_report(stage, before, after, index)
        opts: DistillOptions = self.options  # type: ignore[assignment]
        block: Block = stage.blocks[0]  # type: ignore[assignment]
        if self._pool is not None:
            data, noise = self._pool.data[:2000], self._pool.noise[:2000]
            with torch.no_grad(), self.pool_labels(len(data)):
                err = euler_decode(block, noise, opts.k_steps) - data
            out["k_steps"] = float(opts.k_steps)
            out["endpoint_mse"] = float(err.flatten(1).pow(2).sum(1).mean())
        return out
