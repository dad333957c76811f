"""Configuration files: the TOML reader and writer, ``--config`` / ``--print-config`` of ``train``,
``transport`` and ``worst-case`` (precedence, run folders that re-run, errors naming the key)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from iterflow.cli import main
from iterflow.errors import InputError
from iterflow.io import read_toml, save_json, toml_dumps, toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TINY = ["--data", "8gaussians", "--steps", "20", "--batch-size", "64", "--hidden", "16,16",
        "--n-train", "400", "--n-val", "50", "--n-test", "50", "--dtype", "float64",
        "--no-report", "--quiet"]  # fmt: skip


def printed(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The TOML that ``iterflow ARGV --print-config`` prints (asserting it exits 0)."""
    capsys.readouterr()
    assert main([*argv, "--print-config"]) == 0
    return capsys.readouterr().out


def error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The one-line error of a command that must exit with status 2."""
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iterflow: error: ") and "\n" not in err, err
    return err


def train_config(text: str) -> Any:
    """The TrainConfig a printed train configuration describes."""
    from iterflow.train import TrainConfig

    d = tomllib.loads(text)
    for key in ("out", "report", "eval_n", "tensorboard"):
        d.pop(key, None)
    return TrainConfig.from_json(d)


# ------------------------------------------------------------------------------------------------
# TOML


def test_toml_writer_round_trips_through_tomllib() -> None:
    value = {
        "lr": 0.004, "tiny": 1e-05, "third": 1 / 3, "big": 1e300, "inf": math.inf, "neg": -2,
        "flag": False, "name": 'quote " back\\slash é 日本 \x7f\n tab\t', "widths": [256, 256],
        "mixed": [1.5, "a", True], "empty": [], "weird key": 1, "none": None,
        "options": {"gamma": 0.5, "hs": [0.1, 0.2], "nested": {"x": 1}}, "empty_table": {},
    }  # fmt: skip
    back = tomllib.loads(toml_dumps(value, header="a header\nof two lines"))
    expected = {k: v for k, v in value.items() if v is not None}
    assert back == expected
    assert all(type(back[k]) is type(expected[k]) for k in expected)  # 1e300 stays a float


def test_toml_value_refuses_none_and_objects() -> None:
    with pytest.raises(InputError, match="value"):
        toml_value(None)
    with pytest.raises(InputError, match="value"):
        toml_value(object())
    assert toml_value(torch.tensor(3)) == "3" and toml_value(float("nan")) == "nan"


def test_read_toml_names_the_line_of_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("steps = 10\nlr = = 3\n")
    with pytest.raises(InputError, match=r"config: must be valid TOML .*line 2"):
        read_toml(path)
    with pytest.raises(InputError, match="must be an existing TOML file"):
        read_toml(tmp_path / "missing.toml")


# ------------------------------------------------------------------------------------------------
# iterflow train


def test_print_config_has_every_field_and_reads_back_to_the_same_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import dataclasses

    from iterflow.train import TrainConfig
    from iterflow.train.config import config_hash

    text = printed(capsys, "train", "--method", "jko", "-o", "gamma=0.5", "--steps", "7")
    d = tomllib.loads(text)
    assert {f.name for f in dataclasses.fields(TrainConfig)} - {"img2d_dir"} <= set(d)
    assert "# img2d_dir: unset" in text and "# push_steps = 16  (default)" in text
    # the method's recommendations are resolved (jko: 5 blocks of width 128, gamma overridden)
    assert d["blocks"] == 5 and d["hidden"] == [128, 128, 128] and d["steps"] == 7
    assert d["options"] == {"gamma": 0.5, "substeps": 3, "jacobian": 0.02} and d["time_freqs"] == 0
    cfg = train_config(text)
    expected = TrainConfig.for_method("jko", steps=7, options={"gamma": 0.5})
    assert cfg == expected and config_hash(cfg) == config_hash(expected)
    path = tmp_path / "jko.toml"
    path.write_text(text)
    assert printed(capsys, "train", "--config", str(path)) == text


def test_network_options_round_trip_with_the_same_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.train import TrainConfig
    from iterflow.train.config import config_hash

    text = printed(capsys, "train", "--data", "digits8", "--network", "unet", "--net-option",
                   "channels=16", "--net-option", "channel_mult=1,2", "-o", "sigma=0.1")  # fmt: skip
    assert tomllib.loads(text)["net_options"] == {"channels": 16, "channel_mult": [1, 2]}
    path = tmp_path / "unet.toml"
    path.write_text(text)
    again = printed(capsys, "train", "--config", str(path), "--net-option", "channels=8")
    cfg = train_config(again)
    assert cfg.net_options == {"channels": 8, "channel_mult": [1, 2]}  # merged key by key
    expected = TrainConfig.for_method("fm", data="digits8", network="unet", options={"sigma": 0.1},
                                      net_options={"channels": 8, "channel_mult": [1, 2]})  # fmt: skip
    assert config_hash(cfg) == config_hash(expected)


def test_command_line_wins_and_options_merge_key_by_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'method = "jko"\nsteps = 7\nlr = 0.1\nhidden = [8, 8]\nreport = false\n'
        "[options]\ngamma = 0.5\nsubsteps = 2\n"
    )
    d = tomllib.loads(
        printed(capsys, "train", "--config", str(path), "--steps", "9", "-o", "gamma=2")
    )
    assert d["steps"] == 9 and d["lr"] == 0.1 and d["hidden"] == [8, 8]  # flag > file
    assert d["blocks"] == 5 and d["activation"] == "gelu"  # unset: jko's recommendation
    assert d["report"] is False
    assert d["options"] == {"gamma": 2.0, "substeps": 2, "jacobian": 0.02}  # merged key by key


def test_train_print_config_train_again_reproduces_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.train import load_run
    from iterflow.train.config import config_hash

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "-o", "interpolant=trig", "--seed", "3", "--out", str(a)]) == 0
    text = (a / "config.toml").read_text()
    assert printed(capsys, "train", "--config", str(a / "config.toml")) == text
    assert main(["train", "--config", str(a), "--out", str(b)]) == 0
    (fa, ca, ma), (fb, cb, mb) = load_run(a), load_run(b)
    assert ca == cb and config_hash(ca) == config_hash(cb) == ma["config_hash"] == mb["config_hash"]
    from iterflow.methods import METHODS

    fm_options = METHODS["fm"].recommended["options"]  # flow matching's recommended time density
    assert ca.options == {**fm_options, "interpolant": "trig"} and ca.seed == 3
    for p, q in zip(fa.parameters(), fb.parameters()):
        assert torch.equal(p, q)
    # the run's own folder: the same command again resumes it (nothing to train)
    assert main(["train", "--config", str(a)]) == 0


def test_a_run_folder_without_config_toml_is_read_from_its_config_json(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.io import write_manifest
    from iterflow.train import TrainConfig

    cfg = TrainConfig.for_method("local-fm", steps=11, img2d_dir="/data", options={"h": 0.01})
    run = tmp_path / "run"
    save_json(run / "config.json", cfg.to_json())
    assert train_config(printed(capsys, "train", "--config", str(run))) == cfg
    assert train_config(printed(capsys, "train", "--config", str(run / "config.json"))) == cfg
    write_manifest(run, "train", config=cfg.to_json())
    assert train_config(printed(capsys, "train", "--config", str(run / "manifest.json"))) == cfg


def test_config_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def config(name: str, text: str) -> str:
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    err = error(capsys, "train", "--config", config("a.toml", "stepz = 3\n"), "--print-config")
    assert "a.toml: stepz: is not a setting of `iterflow train`" in err
    assert "did you mean 'steps'?" in err
    err = error(capsys, "train", "--config", config("b.toml", 'steps = "abc"\n'), "--print-config")
    assert err.endswith("b.toml: steps: must be an integer (got 'abc')")
    err = error(capsys, "train", "--config", config("c.toml", "hidden = [16, 1.5]\n"))
    assert "c.toml: hidden: must be an integer (got 1.5)" in err
    bad_value = config("d.toml", 'method = "jko"\nsteps = -4\n[options]\ngamma = "x"\n')
    err = error(capsys, "train", "--config", bad_value, "--print-config")
    assert "d.toml: steps: must be > 0 (got -4)" in err  # the file's key, not --steps
    err = error(capsys, "train", "--config", bad_value, "--steps", "5", "--print-config")
    assert "d.toml: options.gamma: must be a number (got 'x')" in err
    assert printed(capsys, "train", "--config", bad_value, "--steps", "5", "-o", "gamma=1")
    err = error(capsys, "train", "--config", config("e.toml", "options = 3\n"), "--print-config")
    assert "e.toml: options: must be a table" in err
    err = error(capsys, "train", "--config", config("f.toml", "steps = \n"), "--print-config")
    assert "--config: must be valid TOML" in err and "line 1" in err
    err = error(capsys, "train", "--config", str(tmp_path / "none.toml"), "--print-config")
    assert "--config: must be an existing TOML file" in err
    err = error(capsys, "train", "--config", str(tmp_path), "--print-config")
    assert "--config: must be a TOML file or a run folder holding config.toml" in err
    nested = config("g.toml", "config = 'other.toml'\n")
    assert "g.toml: config: is not a setting" in error(capsys, "train", "--config", nested)


# ------------------------------------------------------------------------------------------------
# iterflow transport and iterflow worst-case


def test_transport_config_round_trip_and_precedence(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = printed(capsys, "transport", "--source", "8gaussians", "--target", "moons",
                   "--blocks", "4", "-o", "init_lr=1e-3", "--no-ratio")  # fmt: skip
    d = tomllib.loads(text)
    assert d["source"] == "8gaussians" and d["blocks"] == 4 and d["ratio"] is False
    assert d["hidden"] == [128, 128, 128] and d["options"]["init_lr"] == 0.001
    assert d["options"]["coupling"] == "ot"  # every TransportOptions field, resolved
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert printed(capsys, "transport", "--config", str(path)) == text
    again = printed(capsys, "transport", "--config", str(path), "--target", "circles",
                    "-o", "coupling=sinkhorn", "-o", "blocks=2")  # fmt: skip
    d2 = tomllib.loads(again)
    assert d2["target"] == "circles" and d2["blocks"] == 2 and d2["options"]["init_lr"] == 0.001
    assert d2["options"]["coupling"] == "sinkhorn"
    path.write_text(text.replace("\n[options]\n", "\n[options]\nwidth = 3\n"))
    err = error(capsys, "transport", "--config", str(path), "--print-config")
    assert "t.toml: options.width: must be one of" in err


def test_worst_case_config_errors_and_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = printed(capsys, "worst-case", "--reference", "moons", "--risk", "classifier",
                   "--gamma", "0.3", "--hidden", "32,32")  # fmt: skip
    d = tomllib.loads(text)
    assert d["gamma"] == 0.3 and d["hidden"] == [32, 32] and "data" not in d
    path = tmp_path / "w.toml"
    path.write_text(text)
    assert printed(capsys, "worst-case", "--config", str(path)) == text
    path.write_text(text.replace("gamma = 0.3", "gamma = -1.0"))
    err = error(capsys, "worst-case", "--config", str(path), "--print-config")
    assert "w.toml: gamma: must be > 0 (got -1.0)" in err
    path.write_text(text.replace("gamma = 0.3", "gama = 0.3"))
    err = error(capsys, "worst-case", "--config", str(path), "--print-config")
    assert "w.toml: gama: is not a setting of `iterflow worst-case`; did you mean 'gamma'?" in err
    err = error(capsys, "worst-case", "--config", str(tmp_path / "run.json"), "--print-config")
    assert "--config: must be a TOML file" in err


def test_worst_case_run_folder_re_runs_with_the_same_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["worst-case", "--reference", "8gaussians", "--risk", "linear:1,0", "--steps", "20",
            "--hidden", "16", "--n-train", "200", "--n-test", "100", "--no-baseline",
            "--batch-size", "64", "--quiet"]  # fmt: skip
    assert main([*argv, "--out", str(a)]) == 0
    assert (a / "config.toml").is_file()
    assert main(["worst-case", "--config", str(a), "--out", str(b)]) == 0
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert ma["config"] == mb["config"]
    fa = json.loads((a / "metrics.json").read_text())["flow"]["test"]
    fb = json.loads((b / "metrics.json").read_text())["flow"]["test"]
    assert fa == fb  # the same map: the same figures on the held-out points
