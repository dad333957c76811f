"""Transport run folders: ``manifest.json`` (kind ``transport``), ``blocks/block_XXX.safetensors`` and
``normalization.safetensors``. Nothing is pickled.

The manifest holds the run's ``config`` (``options``, and what identifies the data and the seed),
``event_shape``, ``dtype``, the blocks' ``networks``, the ``cost``, the per-phase ``history`` and
``complete``. Folders of iterflow before the one run-folder format (``transport.json``) still load.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from iterflow.apps.ot.maps import TransportCost
from iterflow.apps.ot.result import TransportOptions, TransportResult, make_result
from iterflow.core.flow import Flow
from iterflow.errors import fail
from iterflow.io import (
    MANIFEST,
    RunDir,
    check_format,
    load_json,
    read_manifest,
    save_tensors,
    write_manifest,
)
from iterflow.methods.transport import blocks_of
from iterflow.train import DTYPES, load_flow

KIND = "transport"
LEGACY_META = "transport.json"


def save_flow(flow: Flow, folder: str | Path) -> None:
    """Write the blocks and the normalisation of ``flow`` (atomically, file by file)."""
    run = RunDir(folder)
    for i, b in enumerate(flow.blocks):
        save_tensors(run.block(i), b.state_dict())
    state = flow.state_dict()
    save_tensors(run.normalization, {"shift": state["shift"], "scale": state["scale"]})


def result_fields(result: TransportResult) -> dict[str, Any]:
    """The manifest fields describing a fitted transport (besides its ``config``)."""
    flow = result.flow
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "event_shape": list(flow.event_shape),
        "dtype": str(flow.shift.dtype).removeprefix("torch."),
        "networks": [b.velocity.config() for b in blocks_of(flow)],  # type: ignore[operator]
        "cost": asdict(result.cost),
        "history": result.history,
        "train_seconds": float(sum(h.get("seconds", 0.0) for h in result.history)),
    }


def save_transport(
    result: TransportResult, folder: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write a transport run: the blocks, the normalisation, then ``manifest.json`` (last: the commit
    record) with the options, network configs, cost, history and ``extra`` (JSON values).

    :func:`load_transport` reads it back.
    """
    folder = Path(folder)
    save_flow(result.flow, folder)
    write_manifest(folder, KIND, config={"options": result.options.to_json()}, complete=True,
                   **result_fields(result), **(extra or {}))  # fmt: skip
    return folder


def recorded(meta: dict[str, Any], key: str) -> Any:
    """``meta["config"][key]`` (the manifest), else ``meta[key]`` (``transport.json``), else None."""
    config = meta.get("config")
    if isinstance(config, dict) and key in config:
        return config[key]
    return meta.get(key)


def load_transport_meta(folder: str | Path) -> dict[str, Any]:
    """The manifest (or the ``transport.json`` of an older folder) of a finished transport run.

    Raises:
        InputError: naming ``run`` when the folder is missing, not a finished transport run, or
            written by a newer format.
    """
    folder = Path(folder)
    if not folder.is_dir():
        fail("run", "must be an existing transport run folder", str(folder))
    if (folder / MANIFEST).is_file():
        meta = read_manifest(folder, KIND, "run")
        if not meta.get("complete") or "networks" not in meta:
            fail("run", "must hold a finished transport run (is it still training?)", str(folder))
        return meta
    meta = load_json(folder / LEGACY_META, "run")
    if not isinstance(meta, dict) or meta.get("kind") != KIND or "networks" not in meta:
        fail("run", f"{LEGACY_META} must describe a transport run", str(folder))
    check_format(meta, "run", str(folder))
    return meta


def load_transport(folder: str | Path, *, device: str | torch.device = "cpu") -> TransportResult:
    """Rebuild the :class:`TransportResult` of a run folder (never unpickles)."""
    folder, run = Path(folder), RunDir(folder)
    meta = load_transport_meta(folder)
    dtype = DTYPES.get(meta.get("dtype", "float32"))
    if dtype is None:
        fail("run", "the recorded 'dtype' must be float32 or float64", meta.get("dtype"))
    source = MANIFEST if (folder / MANIFEST).is_file() else LEGACY_META
    flow = load_flow(run, meta["networks"], meta["event_shape"], dtype=dtype, device=device,
                     source=source)  # fmt: skip
    options = TransportOptions.from_json(recorded(meta, "options"))
    cost = TransportCost(**meta["cost"])
    return make_result(flow, cost, options, list(meta.get("history", [])))
