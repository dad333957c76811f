"""TensorBoard logging: the reporter's scalars, a resumed run's curves, plots as images, and
``iterflow train --tensorboard`` read back from the event files (``log.jsonl`` stays the record)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iterflow.cli import main

pytest.importorskip("tensorboard", reason="the tensorboard package is an optional extra")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from iterflow.train.tensorboard import TensorBoardLog  # noqa: E402


def events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def curve(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class Recorder:
    """A reporter that records the calls it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        self.calls.append(("start", (index, n_stages, total_steps, done_steps)))

    def step(self, step: int, terms: dict[str, float]) -> None:
        self.calls.append(("step", (step, terms)))

    def stage_end(self, record: dict[str, Any]) -> None:
        self.calls.append(("end", record))


def test_reporter_writes_steps_over_all_stages_and_stage_figures(tmp_path: Path) -> None:
    inner = Recorder()
    with TensorBoardLog(tmp_path) as tb:
        rep = tb.reporter(inner)
        for k in range(2):
            rep.stage_start(k, 2, 100, 0)
            rep.step(50, {"loss": 1.0 + k, "fm": 0.25})
            rep.step(100, {"loss": 0.5 + k, "fm": 0.125})
            rep.stage_end({"stage": k, "steps": 100, "movement": 2.0 - k, "blocks": [k]})
    acc = events(tmp_path)
    assert curve(acc, "train/loss") == [(50, 1.0), (100, 0.5), (150, 2.0), (200, 1.5)]
    assert curve(acc, "train/fm") == [(50, 0.25), (100, 0.125), (150, 0.25), (200, 0.125)]
    assert curve(acc, "train_stage/movement") == [(1, 2.0), (2, 1.0)]
    assert "train_stage/steps" not in acc.Tags()["scalars"]  # bookkeeping, not a figure
    assert [c[0] for c in inner.calls] == ["start", "step", "step", "end"] * 2  # all forwarded
    assert inner.calls[1] == ("step", (50, {"loss": 1.0, "fm": 0.25}))


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path: Path) -> None:
    with TensorBoardLog(tmp_path) as tb:  # interrupted after step 150; checkpoint at step 100
        rep = tb.reporter()
        rep.stage_start(0, 1, 200, 0)
        for s in (50, 100, 150):
            rep.step(s, {"loss": float(s)})
    with TensorBoardLog(tmp_path) as tb:  # the resumed run
        rep = tb.reporter()
        rep.stage_start(0, 1, 200, 100)
        for s in (150, 200):
            rep.step(s, {"loss": -float(s)})
    assert curve(events(tmp_path), "train/loss") == [
        (50, 50.0), (100, 100.0), (150, -150.0), (200, -200.0)
    ]  # fmt: skip


def test_phase_progress_of_the_applications_is_forwarded_and_logged(tmp_path: Path) -> None:
    seen = []
    with TensorBoardLog(tmp_path) as tb:
        progress = tb.progress(lambda *call: seen.append(call))
        progress("relaxed-OT refinement", 0, 20, {})
        progress("relaxed-OT refinement", 10, 20, {"loss": 0.5, "kinetic": 2.0})
    acc = events(tmp_path)
    assert curve(acc, "relaxed_ot_refinement/loss") == [(10, 0.5)]
    assert curve(acc, "relaxed_ot_refinement/kinetic") == [(10, 2.0)]
    assert seen[1] == ("relaxed-OT refinement", 10, 20, {"loss": 0.5, "kinetic": 2.0})


def test_plots_become_images(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    img = np.zeros((12, 20, 3))
    img[:, :10, 0] = 1.0
    plt.imsave(tmp_path / "samples.png", img)
    with TensorBoardLog(tmp_path / "tb") as tb:
        assert tb.add_images([tmp_path / "samples.png"]) == ["plots/samples"]
    (image,) = events(tmp_path / "tb").Images("plots/samples")
    assert (image.height, image.width) == (12, 20)


def test_train_tensorboard_matches_the_jsonl_log(tmp_path: Path) -> None:
    out, logdir = tmp_path / "run", tmp_path / "tb"
    argv = ["train", "--method", "fm", "--data", "8gaussians",
            "--steps", "40", "--log-every", "10", "--batch-size", "64", "--hidden", "16,16",
            "--n-train", "400", "--n-val", "50", "--n-test", "100", "--eval-n", "100",
            "--quiet", "--out", str(out), "--tensorboard", str(logdir)]  # fmt: skip
    assert main(argv) == 0
    acc = events(logdir)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # 40 steps / 10
    logged = curve(acc, "train/loss")
    assert [s for s, _ in logged] == [40 * r["stage"] + r["step"] for r in rows]
    assert np.allclose([v for _, v in logged], [r["loss"] for r in rows], rtol=1e-6)
    meta = json.loads((out / "meta.json").read_text())
    movement = [h["movement"] for h in meta["history"]]
    assert np.allclose([v for _, v in curve(acc, "train_stage/movement")], movement, rtol=1e-6)
    tags = acc.Tags()
    assert {"plots/samples", "plots/density", "plots/training"} <= set(tags["images"])
    assert any(t.startswith("config") for t in tags["tensors"])  # the config as text


def test_missing_tensorboard_is_an_error_naming_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    argv = ["train", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("iterflow: error: --tensorboard: needs the tensorboard package")
    assert not (tmp_path / "run").exists()  # refused before training
