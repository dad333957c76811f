"""Named recipes of ``iterflow train --config NAME`` (``iterflow/presets/*.toml``): every preset reads
back to a valid TrainConfig, flags win over the preset, unknown names fail with one clear error,
``--config list`` lists them, and a preset trains end to end with tiny overrides."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from iterflow.cli import main
from iterflow.cli.config_file import is_preset_name, presets, resolve_preset
from iterflow.errors import InputError
from iterflow.io import read_toml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

IMG2D = Path(os.environ.get("ITERFLOW_IMG2D_DIR", "/work/shared/data/img2d"))
TINY = ["--steps", "20", "--blocks", "2", "--batch-size", "64", "--hidden", "16,16",
        "--n-train", "400", "--n-val", "64", "--n-test", "64", "--quiet"]  # fmt: skip


def printed(capsys: pytest.CaptureFixture, *argv: str) -> str:
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def train_config(text: str) -> Any:
    from iterflow.train import TrainConfig

    d = tomllib.loads(text)
    for key in ("out", "report", "eval_n", "tensorboard"):
        d.pop(key, None)
    return TrainConfig.from_json(d)


def test_the_shipped_presets_are_found() -> None:
    names = presets()
    assert {"rose-jko", "tree-local-fm"} <= set(names)
    assert all(p.is_file() and p.suffix == ".toml" for p in names.values())


@pytest.mark.parametrize("name", sorted(presets()))
def test_each_preset_resolves_to_a_valid_train_config(
    name: str, capsys: pytest.CaptureFixture
) -> None:
    raw = read_toml(resolve_preset(name))
    cfg = train_config(printed(capsys, "train", "--config", name))
    assert cfg.method == raw["method"] and cfg.data == raw["data"]
    for key, value in raw.items():  # every setting the preset names, the rest recommended
        if key not in ("out", "options"):
            got = getattr(cfg, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    for key, value in raw.get("options", {}).items():
        assert cfg.options[key] == value, key


def test_flags_win_over_the_preset(capsys: pytest.CaptureFixture) -> None:
    raw = read_toml(resolve_preset("rose-jko"))
    cfg = train_config(
        printed(capsys, "train", "--config", "rose-jko", "--steps", "20", "-o", "gamma=0.25")
    )
    assert cfg.steps == 20 and cfg.blocks == raw["blocks"]
    assert cfg.options["gamma"] == 0.25
    assert all(cfg.options[k] == v for k, v in raw["options"].items() if k != "gamma")


def test_unknown_preset_is_one_error_naming_config_and_the_known_names(
    capsys: pytest.CaptureFixture,
) -> None:
    capsys.readouterr()
    assert main(["train", "--config", "rose-jkoo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iterflow: error: --config") and "\n" not in err, err
    assert "'rose-jkoo'" in err and "preset" in err
    assert all(name in err for name in presets())
    with pytest.raises(InputError) as e:
        resolve_preset("nope")
    assert e.value.argument == "--config"


def test_list_prints_every_preset(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--config", "list"]) == 0
    out = capsys.readouterr().out
    assert [ln.split(":")[0] for ln in out.strip().splitlines()] == sorted(presets())


def test_an_existing_file_or_path_is_never_a_preset_name(tmp_path: Path) -> None:
    (tmp_path / "rose-jko").write_text("steps = 3\n")
    assert not is_preset_name(str(tmp_path / "rose-jko"))  # a path separator
    assert not is_preset_name("rose-jko.toml")  # a suffix
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert not is_preset_name("rose-jko")  # an existing file of that name wins
    finally:
        os.chdir(cwd)
    assert is_preset_name("rose-jko")


def test_a_preset_trains_end_to_end_with_tiny_overrides(tmp_path: Path) -> None:
    """The rose-jko preset with tiny overrides (the data swapped for the built-in checkerboard,
    so that the test needs no image folder) trains and writes its resolved config."""
    out = tmp_path / "run"
    argv = ["train", "--config", "rose-jko", "--data", "checkerboard", "--out", str(out), *TINY]
    assert main([*argv, "--no-report"]) == 0
    written = tomllib.loads((out / "config.toml").read_text())
    raw = read_toml(resolve_preset("rose-jko"))
    assert written["method"] == "jko" and written["steps"] == 20
    assert all(written["options"][k] == v for k, v in raw["options"].items())
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stages_done"] == 2 and all("w2_movement" in r for r in meta["history"])


@pytest.mark.skipif(not (IMG2D / "img_rose.png").is_file(), reason="no img2d folder")
def test_the_rose_preset_runs_on_the_rose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITERFLOW_IMG2D_DIR", str(IMG2D))
    out = tmp_path / "rose"
    assert main(["train", "--config", "rose-jko", "--out", str(out), *TINY, "--no-report"]) == 0
    assert json.loads((out / "meta.json").read_text())["stages_done"] == 2


def test_make_demo_trains_the_preset_the_speed_benchmark_measures(
    capsys: pytest.CaptureFixture,
) -> None:
    """The Makefile's demo recipe is a shipped flow-matching preset on the checkerboard, and it is
    the one ``benchmarks/bench_speed.py`` times as ``make demo`` (issue 14's demo target)."""
    import re

    root = Path(__file__).resolve().parents[1]
    make = (root / "Makefile").read_text()
    name = re.search(r"^DEMO_CONFIG \?= (\S+)$", make, re.M).group(1)
    assert "--config $(DEMO_CONFIG)" in make.split("\ndemo:")[1].split("\n\n")[0]
    bench = (root / "benchmarks" / "bench_speed.py").read_text()
    assert f'DEMO_PRESET = "{name}"' in bench
    cfg = train_config(printed(capsys, "train", "--config", name))
    assert (cfg.method, cfg.data) == ("fm", "checkerboard")
    # the benchmark's rows: make demo's config, then the recommended settings, then the changes
    import argparse

    import torch

    sys.path.insert(0, str(root / "benchmarks"))
    import bench_speed

    rows = bench_speed.demo_configs(
        argparse.Namespace(seed=3), torch.device("cpu"), [{"lr": 0.004}]
    )
    (_, demo), (first, recommended), (change, changed) = rows
    assert (demo.steps, demo.x_freqs, demo.seed) == (cfg.steps, cfg.x_freqs, 3)
    assert demo.time_budget == cfg.time_budget > 0  # the demo fits its steps to the machine
    assert first == {} and recommended.x_freqs == 0 and recommended.data == "checkerboard"
    assert change == {"lr": 0.004} and changed.lr == 0.004 and changed.steps == recommended.steps
