"""Data-parallel training: two gloo processes under ``torchrun`` train the same model as one process
with the same global batch (flow matching with a global-batch OT coupling, a progressive method
whose particle pushes are sharded, CNF and JKO-flow whose ODE integrations are sharded), plus the
sharding arithmetic on its own.

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

from iterflow.core import distributed as ddp
from iterflow.core.flow import Flow
from iterflow.methods import METHODS, Loss, Method
from iterflow.methods.fm import FMOptions, flow_matching_loss
from iterflow.train import TrainConfig, load_run, train

PROGRESSIVE = "test-progressive-fm"


class _ProgressiveFM(Method):
    """A progressive toy method: each block does flow matching from the pushed particles to N(0, I)."""

    name = PROGRESSIVE
    Options = FMOptions
    progressive = True

    def loss(
        self, stage: Flow, batch: tuple[torch.Tensor, ...], index: int, generator: torch.Generator
    ) -> Loss:
        x0 = batch[0]
        x1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return flow_matching_loss(stage.blocks[0], x0, x1, self.options, generator)  # type: ignore[arg-type]


if PROGRESSIVE not in METHODS:
    METHODS.register(PROGRESSIVE, _ProgressiveFM)

BASE = dict(
    data="8gaussians",
    steps=30,
    hidden=(32, 32),
    n_train=1000,
    n_val=101,
    n_test=50,
    checkpoint_every=20,
    log_every=10,
    dtype="float64",
    lr=3e-3,
)
CONFIGS = {
    # 63 rows: shards of 32 and 31 rows; the OT coupling is solved on the global batch.
    "fm_ot": TrainConfig(**BASE, batch_size=63, options={"coupling": "ot"}),
    "progressive": TrainConfig(**BASE, method=PROGRESSIVE, blocks=2, batch_size=64),
    # likelihood methods shard their ODE integrations too (exact trace, regularisers on)
    "cnf": TrainConfig(**{**BASE, "steps": 12, "hidden": (16, 16)}, method="cnf", batch_size=63,
                       options={"steps": 2, "kinetic": 0.1, "jacobian": 0.1}),
    "jko": TrainConfig(**{**BASE, "steps": 12, "hidden": (16, 16)}, method="jko", blocks=2,
                       batch_size=63, options={"substeps": 1, "jacobian": 0.1}),
}  # fmt: skip


def _weights(path: Path) -> list[torch.Tensor]:
    flow, _, _ = load_run(path)
    return [p.detach() for p in flow.parameters()]


def test_shard_bounds_cover_the_batch_and_shard_means_average_to_the_mean() -> None:
    for n, world in [(10, 3), (63, 2), (2, 4), (1024, 8)]:
        bounds = [ddp.shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    values = torch.randn(63, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shares = []
    for rank in range(2):
        ctx = ddp.DistContext(rank=rank, world_size=2, local_rank=rank, backend="gloo")
        with ddp.sharding(ctx):
            rows = ddp.local_rows(63)
            shares.append(ddp.row_mean(values[rows], 63, ctx))
    # The loop averages the ranks' gradients, i.e. the ranks' losses: that average is the global mean.
    assert torch.allclose(sum(shares) / 2, values.mean(), atol=1e-14)
    assert ddp.local_rows(63) == slice(0, 63)  # outside sharding(): every row
    assert torch.equal(ddp.row_mean(values, 63, None), values.mean())
    assert ddp.all_gather_rows(values, 63, None) is values


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_model_as_one(
    tmp_path: Path, torchrun: Callable[..., Any]
) -> None:
    for name, cfg in CONFIGS.items():
        train(cfg, tmp_path / f"one_{name}")
    torchrun(__file__, "--worker", str(tmp_path))  # fails the test unless both ranks exit with 0
    for name in CONFIGS:
        one, two = tmp_path / f"one_{name}", tmp_path / f"two_{name}"
        w1, w2 = _weights(one), _weights(two)
        assert len(w1) == len(w2)
        for a, b in zip(w1, w2):
            assert torch.allclose(a, b, rtol=0, atol=1e-9), float((a - b).abs().max())
        meta = load_run(two)[2]
        assert all(r["world_size"] == 2 for r in meta["history"])
        loss1 = [r["final_loss"] for r in load_run(one)[2]["history"]]
        loss2 = [r["final_loss"] for r in meta["history"]]
        assert loss1 == pytest.approx(loss2, abs=1e-9)  # logged losses are global means
        assert (two / "particles.safetensors").exists()
    # A different global batch gives a different model: the comparison can fail.
    other = CONFIGS["fm_ot"]
    train(dataclasses.replace(other, batch_size=62), tmp_path / "other")
    assert not all(
        torch.allclose(a, b, atol=1e-9)
        for a, b in zip(_weights(tmp_path / "one_fm_ot"), _weights(tmp_path / "other"))
    )


def _worker(folder: Path) -> None:
    """One rank of the two-process run (started by torchrun)."""
    torch.set_num_threads(1)
    for name, cfg in CONFIGS.items():
        result = train(cfg, folder / f"two_{name}")
        assert result.history[-1]["world_size"] == 2


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
