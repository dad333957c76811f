"""Run-folder I/O: atomic JSON and tensors, the manifest (kind, format version) and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iterflow.errors import InputError
from iterflow.io import (
    FORMAT_VERSION,
    MANIFEST,
    check_format,
    load_json,
    load_tensors,
    read_manifest,
    read_record,
    save_json,
    save_tensors,
    write_manifest,
)


def test_json_round_trip_and_clear_errors(tmp_path: Path) -> None:
    save_json(tmp_path / "a.json", {"hidden": (32, 32), "path": tmp_path, "x": torch.tensor(2.5)})
    assert load_json(tmp_path / "a.json") == {"hidden": [32, 32], "path": str(tmp_path), "x": 2.5}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    with pytest.raises(InputError, match="must contain the file b.json") as err:
        load_json(tmp_path / "b.json", "out")
    assert err.value.argument == "out"
    (tmp_path / "empty.json").write_text(" \n")
    with pytest.raises(InputError, match="empty.json must not be empty"):
        load_json(tmp_path / "empty.json")
    (tmp_path / "torn.json").write_text('{"kind": "tr')
    with pytest.raises(InputError, match="torn.json must be valid JSON"):
        load_json(tmp_path / "torn.json")


def test_tensors_round_trip_and_corrupt_files(tmp_path: Path) -> None:
    t = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3)}
    save_tensors(tmp_path / "w.safetensors", t)
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["w"], t["w"])
    (tmp_path / "bad.safetensors").write_bytes(b"garbage" * 3)
    with pytest.raises(InputError, match="valid safetensors"):
        load_tensors(tmp_path / "bad.safetensors")
    (tmp_path / "none.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="must not be empty"):
        load_tensors(tmp_path / "none.safetensors")


def test_manifest_names_kind_and_format(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, "transport", config={"gamma": 0.5}, stages_done=1)
    assert path == tmp_path / MANIFEST
    m = read_manifest(tmp_path, "transport")
    assert m["kind"] == "transport" and m["format_version"] == FORMAT_VERSION
    assert m["config"] == {"gamma": 0.5} and m["stages_done"] == 1 and "iterflow_version" in m
    assert read_manifest(tmp_path) == m  # any kind
    with pytest.raises(InputError, match="must be a 'train' folder, not a 'transport' one"):
        read_manifest(tmp_path, "train")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, "train")
    m = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**m, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InputError, match="newer iterflow") as err:
        read_manifest(tmp_path, "train", argument="out")
    assert err.value.argument == "out" and f"format {FORMAT_VERSION + 1}" in str(err.value)
    with pytest.raises(InputError, match="newer iterflow"):
        check_format({"format_version": "2"}, "run", "x")  # not an integer: not ours to read
    check_format({"format_version": 1}, "run", "x")  # older formats are read
    check_format({}, "run", "x")  # and records from before versioning


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        ("", "manifest.json must not be empty"),
        ("{not json", "manifest.json must be valid JSON"),
        ("[1, 2]", "must be an object naming the folder's kind"),
        ('{"format_version": 2}', "must be an object naming the folder's kind"),
    ],
)
def test_corrupt_manifest_is_a_clear_error(tmp_path: Path, content: str, rule: str) -> None:
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(InputError, match=rule):
        read_manifest(tmp_path)


def test_missing_folder_or_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="existing folder"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(InputError, match="must hold manifest.json"):
        read_manifest(tmp_path)


def test_record_prefers_the_manifest_and_reads_format_1(tmp_path: Path) -> None:
    assert read_record(tmp_path, "train", legacy="meta.json") is None  # nothing committed yet
    save_json(tmp_path / "meta.json", {"format_version": 1, "stages_done": 2})
    assert read_record(tmp_path, "train", legacy="meta.json") == {
        "format_version": 1,
        "stages_done": 2,
    }
    save_json(tmp_path / "meta.json", {"format_version": FORMAT_VERSION + 1})
    with pytest.raises(InputError, match="newer iterflow"):
        read_record(tmp_path, "train", legacy="meta.json")
    write_manifest(tmp_path, "train", stages_done=3)
    assert read_record(tmp_path, "train", legacy="meta.json")["stages_done"] == 3
