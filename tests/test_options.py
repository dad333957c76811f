"""Options coerced once, by annotation: the same configuration from the command line and from Python
is one config (one hash), and library errors name Python arguments that the CLI maps to its flags."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from iterflow.cli import main
from iterflow.cli.options import flag_for, parse_key_values
from iterflow.core.coerce import coerce, field_types
from iterflow.errors import InputError
from iterflow.methods import METHODS, options_record, parse_options, typed_options
from iterflow.train import TrainConfig
from iterflow.train.config import config_hash


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        ("true", bool, True),
        ("off", bool, False),
        (False, bool, False),
        ("3", int, 3),
        ("1e3", int, 1000),
        (4.0, int, 4),
        ("0.5", float, 0.5),
        (1, float, 1.0),
        ("rk4", str, "rk4"),
        (Path("a/b"), str, "a/b"),
        ("0.1,0.2", tuple[float, ...], (0.1, 0.2)),
        ("[1, 2, 2]", Sequence[int], (1, 2, 2)),
        ("(1,2)", tuple[int, ...], (1, 2)),
        ("", tuple[float, ...], ()),
        ([1, 2], tuple[float, ...], (1.0, 2.0)),
        ("1,2", list[int], [1, 2]),
        ("none", float | None, None),
        ("2", float | None, 2.0),
        (None, str | None, None),
        ("none", str | None, "none"),
        ("[1, 2]", Any, [1, 2]),
        ("bf16", Any, "bf16"),
    ],
)
def test_coerce_by_annotation(value: Any, annotation: Any, expected: Any) -> None:
    got = coerce(value, annotation, "x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("value", "annotation", "rule"),
    [
        ("maybe", bool, "true or false"),
        (1, bool, "true or false"),
        ("1.5", int, "an integer"),
        (True, int, "an integer"),
        ("fast", float, "a number"),
        (3, str, "a string"),
        ("0.1,x", tuple[float, ...], "comma-separated numbers"),
        (None, float, "a number"),
        ("x", int | None, "an integer or none"),
    ],
)
def test_coerce_errors_name_the_argument_and_type(value: Any, annotation: Any, rule: str) -> None:
    with pytest.raises(InputError, match=rule) as err:
        coerce(value, annotation, "gamma")
    assert err.value.argument == "gamma"


def test_values_only_mode_refuses_text() -> None:
    assert coerce(1, float, "lr", text=False) == 1.0
    assert coerce([32, 32], tuple[int, ...], "hidden", text=False) == (32, 32)
    for value, annotation in (("0.1", float), ("yes", bool), ("32,32", tuple[int, ...])):
        with pytest.raises(InputError):
            coerce(value, annotation, "x", text=False)
    with pytest.raises(InputError, match="an integer"):
        coerce(10.0, int, "steps", text=False)


def test_field_types_of_dataclasses_and_constructors() -> None:
    types = field_types(METHODS["local-fm"].Options)
    assert types["hs"] == tuple[float, ...] and types["h"] is float and types["final_block"] is bool
    from iterflow.core.nn import UNet

    assert field_types(UNet)["channel_mult"] == Sequence[int]


def test_parse_options_one_coercion_for_text_and_values() -> None:
    lfm = METHODS["local-fm"]
    text = parse_options(lfm, {"hs": "0.05,0.2", "final_block": "false", "report_n": "100"})
    values = parse_options(lfm, {"hs": [0.05, 0.2], "final_block": False, "report_n": 100})
    assert text == values and text.hs == (0.05, 0.2)
    assert typed_options(lfm, {"hs": "0.05,0.2"}) == {"hs": [0.05, 0.2]}  # JSON form: a list
    record = options_record(text)
    assert record["hs"] == [0.05, 0.2] and record["interpolant"] == "straight"  # every field
    assert json.loads(json.dumps(record)) == record


def test_option_errors_name_the_option() -> None:
    with pytest.raises(InputError) as err:
        parse_options(METHODS["cnf"], {"steps": "0"})  # CNF's own steps, not the trainer's
    assert err.value.argument == "option 'steps'"
    with pytest.raises(InputError, match="for method 'fm'") as err:
        parse_options(METHODS["fm"], {"gamma": "1"})
    assert err.value.argument == "option 'gamma'"
    with pytest.raises(InputError, match="a number") as err:
        parse_options(METHODS["jko"], {"gamma": "big"})
    assert err.value.argument == "option 'gamma'"


def test_same_configuration_from_cli_text_and_python_values() -> None:
    """What `iterflow train -o ...` builds (text) and what Python builds (values) are one config."""
    cli = TrainConfig.for_method(
        "local-fm",
        steps=40,
        lr=0.002,
        hidden=(32, 32),
        options=parse_key_values(["hs=0.05,0.2", "final-block=false", "h_growth=2"]),
    )
    py = TrainConfig.for_method(
        "local-fm",
        steps=40,
        lr=2e-3,
        hidden=[32, 32],
        options={"hs": (0.05, 0.2), "final_block": False, "h_growth": 2},
    )
    assert cli == py and config_hash(cli) == config_hash(py)
    given = {"hs": [0.05, 0.2], "final_block": False, "h_growth": 2.0}
    assert cli.options == {**METHODS["local-fm"].recommended.get("options", {}), **given}
    assert TrainConfig.from_json(json.loads(json.dumps(cli.to_json()))) == cli  # round trip
    assert config_hash(TrainConfig(lr=1)) == config_hash(TrainConfig(lr=1.0))
    assert config_hash(TrainConfig(method="jko", options={"gamma": 1})) != config_hash(
        TrainConfig(method="jko", options={"gamma": 2})
    )


def test_format_1_config_with_text_options_hashes_like_the_typed_one() -> None:
    """config.json of earlier versions held the command line's text: it reads as the typed config."""
    old = {**TrainConfig(method="jko").to_json(), "options": {"gamma": "0.5", "substeps": "2"}}
    typed = TrainConfig(method="jko", options={"gamma": 0.5, "substeps": 2})
    assert config_hash(TrainConfig.from_json(old)) == config_hash(typed)


def test_net_options_coerced_by_the_network_constructor() -> None:
    cfg = TrainConfig(network="unet", net_options=parse_key_values(["channel_mult=[1,2]",
                      "channels=8", "autocast=bf16", "dropout=0"]))  # fmt: skip
    assert cfg.net_options == {"channel_mult": [1, 2], "channels": 8, "autocast": "bf16",
                               "dropout": 0.0}  # fmt: skip
    same = TrainConfig(network="unet", net_options={"channel_mult": (1, 2), "channels": 8,
                       "autocast": "bf16", "dropout": 0})  # fmt: skip
    assert config_hash(cfg) == config_hash(same)
    with pytest.raises(InputError, match="for network 'unet'") as err:
        TrainConfig(network="unet", net_options={"width": 3})
    assert err.value.argument == "net option 'width'"


def test_library_errors_name_python_arguments() -> None:
    for kwargs, argument in (
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"method": "gan"}, "method"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"compile": "yes"}, "compile"),
        ({"options": {"nope": 1}}, "option 'nope'"),
    ):
        with pytest.raises(InputError) as err:
            TrainConfig(**kwargs)
        assert err.value.argument == argument and "--" not in str(err.value)


def test_flag_table() -> None:
    flags = {"batch_size": "--batch-size", "out": "--out", "n": "--n"}
    assert flag_for("batch_size", flags) == "--batch-size"
    assert flag_for("out", flags) == "--out"
    assert flag_for("option 'gamma'", flags) == "-o gamma"
    assert flag_for("net option 'channels'", flags) == "--net-option channels"
    assert flag_for("options", flags) == "-o"
    assert flag_for("run", flags) == "run"  # a positional argument keeps its name
    assert flag_for("--hidden", flags) == "--hidden"  # the CLI's own errors already name flags


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--batch-size", "0"], "--batch-size: must be > 0"),
        (["--lr-schedule", "step"], "--lr-schedule: must be"),
        (["--method", "jko", "-o", "gamma=big"], "-o gamma: must be a number"),
        (["--method", "cnf", "-o", "steps=0"], "-o steps: must be > 0"),
        (["--network", "unet", "--net-option", "width=3"], "--net-option width: must be one of"),
        (["--device", "cuda:7"], "--device: "),
    ],
)
def test_cli_shows_flags(
    args: list[str], shown: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code = main(["train", "--out", str(tmp_path / "r"), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2 and shown in err and "Traceback" not in err, err
