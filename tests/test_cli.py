"""The CLI contract: an end-to-end run, JSON keys, and exit status 2 with one line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iterflow.cli import main

TINY = [
    "--steps",
    "40",
    "--batch-size",
    "128",
    "--hidden",
    "32,32",
    "--n-train",
    "2000",
    "--n-val",
    "200",
    "--n-test",
    "300",
    "--quiet",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "iterflow.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    p = run_cli(
        "train",
        "--method",
        "fm",
        "--data",
        "8gaussians",
        "--seed",
        "3",
        "--out",
        str(out),
        "--eval-n",
        "200",
        *TINY,
    )
    assert p.returncode == 0, p.stderr
    return out


def test_train_writes_a_complete_run_folder(run_dir: Path) -> None:
    for name in (
        "config.json",
        "meta.json",
        "manifest.json",
        "log.jsonl",
        "metrics.json",
        "samples.npy",
        "normalization.safetensors",
        "blocks/block_000.safetensors",
        "plots/samples.png",
        "plots/density.png",
        "plots/trajectories.png",
        "plots/training.png",
    ):
        assert (run_dir / name).exists(), name
    assert np.load(run_dir / "samples.npy").shape == (5000, 2)


def test_eval_json_keys(run_dir: Path) -> None:
    p = run_cli("eval", str(run_dir), "--n", "200", "--json")
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout)
    for key in ("nll", "entropy", "w2", "mmd", "w2_by_nfe", "inversion_error", "per_block"):
        assert key in m, key
    assert sorted(int(k) for k in m["w2_by_nfe"]) == [1, 2, 4, 8, 32]
    assert (
        m["entropy"] is not None and m["nll"] > m["entropy"] - 0.2
    )  # 8gaussians: exact entropy known


def test_sample_info_plot(run_dir: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "sample",
                str(run_dir),
                "--n",
                "50",
                "--out",
                str(tmp_path / "s.npy"),
                "--solver",
                "rk4",
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "s.npy").shape == (50, 2)
    assert main(["info", str(run_dir)]) == 0
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "plots"), "--n", "500"]) == 0
    assert (tmp_path / "plots" / "density.png").exists()


def test_eval_on_another_data_set(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(
            [
                "eval",
                str(run_dir),
                "--data",
                "checkerboard",
                "--n",
                "100",
                "--json",
                "--solver",
                "rk4",
                "--steps",
                "8",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["data"] == "checkerboard"


def bad(args: list[str], capsys: pytest.CaptureFixture, *needles: str) -> None:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_bad_names(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    out = str(tmp_path / "x")
    bad(["train", "--data", "nosuchdata", "--out", out, *TINY], capsys, "--data", "nosuchdata")
    bad(["train", "--method", "gan", "--out", out, *TINY], capsys, "--method", "gan")
    bad(["train", "-o", "interpolant=curvy", "--out", out, *TINY], capsys, "interpolant", "curvy")
    bad(["train", "-o", "noequals", "--out", out, *TINY], capsys, "--option")
    bad(["train", "--out", out, *TINY, "--hidden", "a,b"], capsys, "--hidden")
    bad(["train", "--steps", "0", "--out", out, *TINY[2:]], capsys, "--steps")
    bad(["train", "--device", "cuda:7", "--out", out, *TINY], capsys, "--device")


def test_bad_files(capsys: pytest.CaptureFixture, tmp_path: Path, run_dir: Path) -> None:
    out = str(tmp_path / "x")
    nan = tmp_path / "nan.npy"
    arr = np.random.default_rng(0).normal(size=(100, 2))
    arr[5, 1] = np.nan
    np.save(nan, arr)
    bad(["train", "--data", str(nan), "--out", out, *TINY], capsys, "finite", "nan.npy")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    bad(["train", "--data", str(empty), "--out", out, *TINY], capsys, "empty.csv")
    bad(
        ["train", "--data", str(tmp_path / "missing.npy"), "--out", out, *TINY],
        capsys,
        "missing.npy",
    )
    bad(["eval", str(tmp_path / "norun")], capsys, "run")
    bad(["sample", str(run_dir), "--out", str(tmp_path / "s.txt")], capsys, "--out", ".npy")
    bad(["eval", str(run_dir), "--solver", "rk5"], capsys, "solver", "rk5")
    bad(["eval", str(run_dir), "--data", "sklearn:wine"], capsys, "--data")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--no-such-flag"]) == 2
    assert main(["frobnicate"]) == 2


def test_corrupt_checkpoint_via_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture, run_dir: Path
) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "blocks" / "block_000.safetensors").write_bytes(b"garbage" * 10)
    bad(["eval", str(copy)], capsys, "block_000.safetensors")


def test_method_recommendations_fill_only_what_is_not_given(tmp_path: Path) -> None:
    """`iterflow train --method jko` takes JKO's tuned settings where the user gave none."""
    from iterflow.methods import METHODS
    from iterflow.train import TrainConfig

    rec = METHODS["jko"].recommended
    cfg = TrainConfig.for_method("jko", steps=7, options={"gamma": "0.3"})
    assert cfg.steps == 7 and cfg.blocks == rec["blocks"] and cfg.hidden == rec["hidden"]
    assert cfg.options == {**rec["options"], "gamma": 0.3}  # typed once, at the boundary
    # flow matching's are the plain defaults but for its learning rate and time density
    fm_rec = METHODS["fm"].recommended
    assert TrainConfig.for_method("fm") == TrainConfig(lr=fm_rec["lr"], options=fm_rec["options"])
    unet = TrainConfig.for_method("jko", network="unet")  # tuned for the MLP: only the options
    assert unet.blocks == TrainConfig().blocks and unet.options == rec["options"]

    out = tmp_path / "jko"
    args = ["--blocks", "1", "--steps", "2", "--n-train", "300", "--n-val", "50", "--n-test", "50"]
    p = run_cli("train", "--method", "jko", "--data", "moons", "-o", "substeps=1", "--out", str(out),
                "--no-report", "--quiet", *args)  # fmt: skip
    assert p.returncode == 0, p.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["blocks"], cfg["steps"], cfg["n_train"]) == (1, 2, 300)  # given
    assert cfg["hidden"] == list(rec["hidden"]) and cfg["batch_size"] == rec["batch_size"]
    assert cfg["lr"] == rec["lr"] and cfg["activation"] == rec["activation"]
    assert cfg["options"]["jacobian"] == rec["options"]["jacobian"]
    assert cfg["options"]["substeps"] == 1  # the user's option wins, typed in config.json


def test_ctrl_c_exits_130_with_the_resume_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    import iterflow.train

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(iterflow.train, "train", interrupted)
    assert main(["train", "--out", str(tmp_path / "r"), *TINY]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    bad(["train", "--out", str(f), *TINY], capsys, "--out", "not a file", "notes.txt")
    assert f.read_text() == "mine"
    bad(["reflow", str(f), "--out", str(tmp_path / "r")], capsys, "run")  # not a run folder


def test_plot_out_must_not_be_a_file(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    f = tmp_path / "plots.png"
    f.write_text("x")
    bad(["plot", str(run_dir), "--out", str(f)], capsys, "--out", "not a file")


def test_info_shows_the_kind_and_format(run_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from iterflow.io import FORMAT_VERSION

    assert main(["info", str(run_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "train" and out["format_version"] == FORMAT_VERSION
    assert out["config"]["method"] == "fm" and out["meta"]["stages_done"] == 1


def test_newer_format_folder_exits_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    copy = tmp_path / "newer"
    shutil.copytree(run_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    for args in (["info", str(copy)], ["eval", str(copy)], ["sample", str(copy), "--out",
                 str(tmp_path / "s.npy")]):  # fmt: skip
        bad(args, capsys, "format 99", "newer iterflow")
    bad(["train", "--method", "fm", "--data", "8gaussians", "--seed", "3", "--out", str(copy),
         *TINY], capsys, "--out", "newer iterflow")  # fmt: skip
    (copy / "manifest.json").write_text("")
    bad(["info", str(copy)], capsys, "manifest.json must not be empty")


# The same configuration from the command line and from Python: one config hash, and either
# resumes the other's run folder.
CROSS_FLAGS = ["--method", "fm", "--data", "8gaussians", "--steps", "30", "--batch-size", "64",
               "--hidden", "16,16", "--n-train", "500", "--n-val", "50", "--n-test", "50",
               "--dtype", "float64", "--lr", "0.004", "--checkpoint-every", "10", "-o", "sigma=0",
               "-o", "interpolant=trig", "--no-report", "--quiet"]  # fmt: skip


def _cross_config() -> Any:
    from iterflow.train import TrainConfig

    return TrainConfig.for_method("fm", data="8gaussians", steps=30, batch_size=64,
                                  hidden=[16, 16], n_train=500, n_val=50, n_test=50,
                                  dtype="float64", lr=4e-3, checkpoint_every=10,
                                  options={"sigma": 0, "interpolant": "trig"})  # fmt: skip


def test_cli_and_python_configs_hash_alike_and_resume_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import iterflow.train
    from iterflow.train import TrainConfig, load_run, train
    from iterflow.train.config import config_hash

    cfg = _cross_config()
    ref = train(cfg, tmp_path / "ref").flow
    # Python starts, the command line resumes
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "py", stop_after_steps=15)
    assert main(["train", *CROSS_FLAGS, "--out", str(tmp_path / "py")]) == 0
    cli_cfg = TrainConfig.from_json(json.loads((tmp_path / "py" / "config.json").read_text()))
    assert cli_cfg == cfg and config_hash(cli_cfg) == config_hash(cfg)
    # the command line starts (and is interrupted), Python resumes
    real_train = iterflow.train.train

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        return real_train(*args, **kwargs, stop_after_steps=15)

    monkeypatch.setattr(iterflow.train, "train", interrupted)
    assert main(["train", *CROSS_FLAGS, "--out", str(tmp_path / "cli")]) == 130
    monkeypatch.undo()
    assert (tmp_path / "cli" / "progress.safetensors").exists()
    train(cfg, tmp_path / "cli")
    for run in ("py", "cli"):
        flow = load_run(tmp_path / run)[0]
        for p, q in zip(ref.parameters(), flow.parameters()):
            assert torch.equal(p, q), run


def test_cli_resume_in_another_environment_warns_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.train import train

    with pytest.raises(KeyboardInterrupt):
        train(_cross_config(), tmp_path / "run", stop_after_steps=15)
    progress = tmp_path / "run" / "progress.json"
    saved = json.loads(progress.read_text())
    saved["environment"]["torch"] = "1.0.0"  # as if checkpointed by another PyTorch
    progress.write_text(json.dumps(saved))
    capsys.readouterr()
    assert main(["train", *CROSS_FLAGS, "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "warning" in ln]
    assert line.startswith("iterflow: warning (ResumeWarning): resuming from step 10 of stage 0")
    assert "torch '1.0.0' then" in line and "Traceback" not in err


def test_info_reads_the_manifest_of_other_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.io import save_json, write_manifest

    write_manifest(tmp_path, "worst-case", config={"gamma": 0.5}, phases_done=["map"])
    save_json(tmp_path / "metrics.json", {"risk": 1.25})
    assert main(["info", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "worst-case" and out["config"] == {"gamma": 0.5}
    assert out["manifest"]["phases_done"] == ["map"] and out["metrics"] == {"risk": 1.25}
