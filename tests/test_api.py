"""The tensor-first Python API: ``iterflow.fit`` on tensors, arrays and Datasets, with the user's own
velocity modules, conditioning through keyword arguments, and no files unless a folder is given."""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import iterflow
from iterflow.core.conditioning import bound_rows, conditioning
from iterflow.core.distributed import DistContext, sharding
from iterflow.core.nn import MLPVelocity
from iterflow.errors import InputError
from iterflow.train import TrainConfig, load_run, train

TINY = {"steps": 30, "batch_size": 64, "hidden": (16,), "log_every": 10}


class TinyVelocity(nn.Module):
    """A user's velocity ``v(x, t)``: an MLP on ``[x, t]``; ``t`` is 0-dim or ``(B,)``."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, dim))
        self.time_shapes: set[tuple[int, ...]] = set()

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        assert t.ndim == 0 or t.shape == (x.shape[0],)
        self.time_shapes.add(tuple(t.shape))
        return self.net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))


class Recorder(TinyVelocity):
    """Records the conditioning it receives and the particles of its first call at ``t = 0``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor | float, *, ident: Tensor) -> Tensor:  # type: ignore[override]
        assert ident.shape == x.shape  # the rows of this batch
        if torch.as_tensor(t).ndim == 0 and float(t) == 0.0:
            self.calls.append((x.detach().clone(), ident.clone(), torch.as_tensor(t)))
        return super().forward(x, t)


def weights(flow: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in flow.parameters()]


def gaussian(n: int = 600, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [2.0, 0.5], dtype=torch.float64
    ) + torch.tensor([3.0, -1.0], dtype=torch.float64)


def test_user_module_on_a_float64_tensor_learns_the_data() -> None:
    x = gaussian()
    v = TinyVelocity()
    before = weights(v)
    result = iterflow.fit("fm", x, velocity=v, steps=300, batch_size=256, lr=5e-3)
    flow = result.flow
    assert flow.shift.dtype == torch.float64  # the dtype of the input tensor
    assert isinstance(flow.blocks[0].velocity, TinyVelocity) and flow.blocks[0].velocity is not v
    assert all(torch.equal(a, b) for a, b in zip(before, weights(v)))  # the user's module untouched
    assert v.time_shapes == set()
    assert {len(s) for s in flow.blocks[0].velocity.time_shapes} == {0, 1}  # t 0-dim and (B,)
    s = flow.sample(2000, generator=torch.Generator().manual_seed(1), solver="rk4", steps=8)
    assert s.dtype == torch.float64
    assert torch.allclose(s.mean(0), x.mean(0), atol=0.3)
    assert torch.allclose(s.std(0), x.std(0), rtol=0.2)
    assert result.run_dir is None and len(result.history) == 1
    assert result.splits.train.shape == x.shape and result.splits.test.shape == (0, 2)


def test_tensor_array_and_datasets_train_the_same_model() -> None:
    x = gaussian(200)
    settings = {**TINY, "dtype": "float64", "seed": 3}
    v = TinyVelocity()  # deep-copied into the block: every fit starts from its weights

    def fitted(data: object) -> list[Tensor]:
        return weights(iterflow.fit("fm", data, velocity=v, **settings).flow)

    class Pairs(torch.utils.data.Dataset):  # items (x, label): the rows are the first element
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> tuple[Tensor, int]:
            return x[i], i % 3

    ref = fitted(x)
    for data in (x.numpy(), torch.utils.data.TensorDataset(x, torch.zeros(len(x))), Pairs()):
        assert all(torch.equal(a, b) for a, b in zip(ref, fitted(data))), type(data).__name__
    other = weights(iterflow.fit("fm", x, velocity=v, **{**settings, "seed": 4}).flow)
    assert not all(torch.equal(a, b) for a, b in zip(ref, other))


def test_array_defaults_to_float32_and_builtin_network() -> None:
    arr = gaussian(200).numpy()
    result = iterflow.fit("fm", arr, **TINY)
    assert result.flow.shift.dtype == torch.float32  # NumPy's float64 is a default, not a choice
    assert isinstance(result.flow.blocks[0].velocity, MLPVelocity)
    assert iterflow.fit("fm", arr, dtype="float64", **TINY).flow.shift.dtype == torch.float64


def test_nothing_is_written_without_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch creates its (empty) compiler cache folder $TMPDIR/torchinductor_$USER when the first
    # optimiser imports torch._dynamo: torch's doing, once per process, before the folders we watch
    import torch._dynamo  # noqa: F401

    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    x = gaussian(200)
    iterflow.fit("fm", x, velocity=TinyVelocity(), **{**TINY, "checkpoint_every": 5})
    iterflow.fit("jko", x, blocks=2, steps=5, hidden=(8,), options={"substeps": 1})
    train(TrainConfig(data="moons", n_train=200, n_val=20, n_test=20, **TINY), None)
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []


def test_conditioning_keywords_reach_the_module_row_by_row() -> None:
    x = gaussian(300)
    rec = Recorder()
    iterflow.fit(
        "cnf",
        x,
        velocity=lambda: rec,  # a factory: the trained block is `rec` itself
        cond={"ident": x},
        standardize="none",
        steps=3,
        batch_size=32,
        options={"steps": 2},
    )
    assert len(rec.calls) >= 3
    for x_in, ident, _ in rec.calls:
        assert torch.equal(x_in, ident)  # each row of the batch gets its own conditioning row


def test_class_conditional_flow_samples_each_class() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 2
    x = torch.randn(600, 2, generator=g, dtype=torch.float64) * 0.3
    x[:, 0] += torch.where(y == 1, 2.0, -2.0).double()
    net = MLPVelocity(2, hidden=(32, 32), time_freqs=2, num_classes=2)
    flow = iterflow.fit(
        "fm", x, velocity=net, cond={"y": y}, steps=400, batch_size=256, lr=5e-3
    ).flow
    gen = torch.Generator().manual_seed(1)
    for label, centre in ((0, -2.0), (1, 2.0)):
        with torch.no_grad(), iterflow.conditioning(y=torch.full((500,), label)):
            s = flow.sample(500, generator=gen, solver="rk4", steps=8)
        assert abs(float(s[:, 0].mean()) - centre) < 0.3, label


def test_bound_rows_follow_the_data_parallel_shard() -> None:
    labels = torch.arange(10)
    with conditioning(y=labels):
        assert torch.equal(bound_rows(10)["y"], labels)
        with sharding(DistContext(rank=1, world_size=2, local_rank=1, backend="gloo")):
            assert torch.equal(bound_rows(5)["y"], labels[5:])  # this rank's rows of the batch
        with pytest.raises(InputError, match="cond"):
            bound_rows(3)
    assert bound_rows(3) == {}
    with pytest.raises(InputError, match="cond"):
        with conditioning(a=torch.zeros(3), b=torch.zeros(4)):
            pass


def test_a_run_folder_with_a_user_module_loads_with_that_module(tmp_path: Path) -> None:
    x = gaussian(200)
    settings = {**TINY, "checkpoint_every": 10}
    result = iterflow.fit("fm", x, velocity=TinyVelocity(), out=tmp_path / "r", **settings)
    assert result.run_dir == tmp_path / "r" and (tmp_path / "r" / "config.json").exists()
    with pytest.raises(InputError, match="velocity"):
        load_run(tmp_path / "r")  # weights only: the folder cannot rebuild the user's class
    flow, cfg, meta = load_run(tmp_path / "r", velocity=TinyVelocity())
    assert cfg.dtype == "float64" and meta["data"]["n_rows"] == 200
    assert all(torch.equal(a, b) for a, b in zip(weights(result.flow), weights(flow)))
    again = iterflow.fit("fm", x, velocity=TinyVelocity(), out=tmp_path / "r", **settings)
    assert all(torch.equal(a, b) for a, b in zip(weights(result.flow), weights(again.flow)))
    with pytest.raises(InputError, match="another config"):  # other rows: another fingerprint
        iterflow.fit("fm", x + 1, velocity=TinyVelocity(), out=tmp_path / "r", **settings)


def test_resume_after_interruption_equals_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A two-block run of a user's module factory, interrupted in its second block, resumes (the
    finished block rebuilt from the factory) to the uninterrupted model."""
    import iterflow.apps.api as api

    x = gaussian(200)
    settings = {**TINY, "blocks": 2, "checkpoint_every": 10, "seed": 2}
    ref = iterflow.fit("local-fm", x, velocity=TinyVelocity, **settings).flow
    real = api.train_tensors
    monkeypatch.setattr(api, "train_tensors", functools.partial(real, stop_after_steps=45))
    with pytest.raises(KeyboardInterrupt):
        iterflow.fit("local-fm", x, velocity=TinyVelocity, out=tmp_path / "r", **settings)
    assert (tmp_path / "r" / "progress.safetensors").exists()
    monkeypatch.setattr(api, "train_tensors", real)
    resumed = iterflow.fit("local-fm", x, velocity=TinyVelocity, out=tmp_path / "r", **settings)
    assert len(resumed.flow.blocks) == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(ref), weights(resumed.flow)))


def test_errors_name_the_argument() -> None:
    x = gaussian(50)
    with pytest.raises(InputError, match="^x: "):
        iterflow.fit("fm", torch.zeros(10))
    with pytest.raises(InputError, match="^x: .*finite"):
        iterflow.fit("fm", torch.full((10, 2), float("nan")))
    with pytest.raises(InputError, match="^x: .*real numbers"):
        iterflow.fit("fm", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(InputError, match="^cond: .*velocity"):
        iterflow.fit("fm", x, cond={"y": torch.zeros(50)})
    with pytest.raises(InputError, match="^cond: .*one row per row"):
        iterflow.fit("fm", x, velocity=TinyVelocity(), cond={"y": torch.zeros(49)})
    with pytest.raises(InputError, match="^data: "):
        iterflow.fit("fm", x, data="moons")
    with pytest.raises(InputError, match="^config: "):
        iterflow.fit("fm", x, config=TrainConfig(method="cnf"))
    with pytest.raises(InputError, match="^velocity: "):
        iterflow.fit("fm", x, velocity=42, **TINY)  # type: ignore[arg-type]


def test_config_and_settings() -> None:
    x = gaussian(100)
    cfg = TrainConfig(method="fm", steps=10, hidden=(8,), dtype="float64")
    result = iterflow.fit("fm", x, config=cfg, steps=5)
    assert result.history[0]["steps"] == 5
    assert result.flow.blocks[0].velocity.hidden == (8,)


def test_import_iterflow_stays_light() -> None:
    code = (
        "import sys, iterflow; "
        "assert not any(m.startswith(('iterflow.apps', 'iterflow.train', 'sklearn')) "
        "for m in sys.modules), sorted(sys.modules); "
        "assert callable(iterflow.fit) and iterflow.FlowDensity.__name__ == 'FlowDensity'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
