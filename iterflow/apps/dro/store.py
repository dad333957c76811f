"""Worst-case run folders: the map's files, its record, and resumption.

A folder holds ``manifest.json`` (kind ``worst-case``: the config with typed values, the run's other
settings, the phases done, and once the map is trained its ``networks``, ``event_shape``, ``train``
assessment, ``history`` and ``seconds``), ``blocks/block_XXX.safetensors``,
``normalization.safetensors``, the classifier's ``classifier.json`` / ``classifier.safetensors`` when
the risk is one, ``log.jsonl``, and ``progress.*`` while a phase is in flight. Every file is written
atomically, the manifest last (it is the commit record). Folders of earlier versions (``dro.json``)
are still read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from iterflow.apps.dro.config import DROConfig
from iterflow.apps.dro.map import Assessment, WorstCaseMap, WorstCaseResult
from iterflow.core import distributed as ddp
from iterflow.core.flow import Flow
from iterflow.core.store import load_flow
from iterflow.errors import InputError, fail
from iterflow.io import (
    MANIFEST,
    RunDir,
    check_format,
    load_json,
    read_manifest,
    save_tensors,
    write_manifest,
)
from iterflow.train.config import DTYPES

KIND = "worst-case"
LEGACY_RECORD = "dro.json"  # the record of folders written before the manifest
_HEADER = ("kind", "format_version", "iterflow_version")


class WorstCaseFolder:
    """A worst-case run folder being written (see the module docstring).

    Arguments:
        path: the folder; write: whether this process writes (``False`` on the non-main ranks of a
            data-parallel job, which only read); argument: the name errors give the folder.
    """

    def __init__(self, path: str | Path, *, write: bool = True, argument: str = "folder") -> None:
        self.path, self.write, self.argument = Path(path), write, argument
        self.run = RunDir(self.path)
        self.record: dict[str, Any] = {}

    def open(
        self,
        config: DROConfig,
        settings: dict[str, Any] | None = None,
        ctx: ddp.DistContext | None = None,
    ) -> dict[str, Any]:
        """Create the folder, or check that it holds a run of the same ``config`` (and ``settings``,
        the caller's other options, when given) to resume; return its record. Under data
        parallelism (``ctx``) every rank checks the folder before rank 0 creates it.

        Raises:
            InputError: naming ``argument`` for a file, a folder of another kind, config or format,
                or a non-empty folder that is not a worst-case run.
        """
        p = self.path
        if p.exists() and not p.is_dir():
            fail(self.argument, "must be a folder, not a file", str(p))
        if (p / MANIFEST).is_file():
            m = read_manifest(p, KIND, self.argument)
            try:
                old = DROConfig.from_json(m.get("config", {}))
            except (TypeError, InputError) as e:
                fail(self.argument, f"holds a config this version cannot read ({e})", str(p))
            diff = config.same_run(old)
            if settings is not None and m.get("settings") != settings:
                prev = m.get("settings") or {}
                diff.update({k: (prev.get(k), v) for k, v in settings.items() if prev.get(k) != v})
            if diff:
                fail(self.argument, f"already holds a worst-case run with another config {diff}; "
                     "use a new folder", str(p))  # fmt: skip
            self.record = {k: v for k, v in m.items() if k not in _HEADER}
            self.record["config"] = config.to_json()  # runtime keys (device, ...) may change
            return self.record
        if (p / LEGACY_RECORD).is_file():
            fail(self.argument, f"holds a worst-case map of an older format ({LEGACY_RECORD}) that "
                 "cannot be resumed; use a new folder", str(p))  # fmt: skip
        if p.exists() and any(p.iterdir()):
            fail(self.argument, "must be a new or empty folder, or a worst-case folder to resume",
                 str(p))  # fmt: skip
        ddp.barrier(ctx)
        self.record = {"config": config.to_json(), "phases": {}}
        if settings is not None:
            self.record["settings"] = settings
        self.commit()
        return self.record

    def phase(self, name: str) -> dict[str, Any]:
        """What the record says of phase ``name`` (``{}``: not started)."""
        return dict(self.record.get("phases", {}).get(name, {}))

    def commit(self, phase: str | None = None, state: dict[str, Any] | None = None,
               **fields: Any) -> None:  # fmt: skip
        """Record ``fields`` (and phase ``phase``'s ``state``) and rewrite the manifest atomically."""
        if phase is not None:
            self.record.setdefault("phases", {})[phase] = dict(state or {})
        self.record.update(fields)
        if self.write:
            write_manifest(self.path, KIND, **self.record)

    def save_blocks(self, flow: Flow, indices: list[int]) -> list[dict[str, Any]]:
        """Write the blocks ``indices`` and the normalisation; return every block's network config."""
        if self.write:
            for i in indices:
                save_tensors(self.run.block(i), flow.blocks[i].state_dict())
            norm = {"shift": cast(Tensor, flow.shift), "scale": cast(Tensor, flow.scale)}
            save_tensors(self.run.normalization, norm)
        return [b.velocity.config() for b in flow.blocks]  # type: ignore[union-attr,operator]


def save_worst_case(result: WorstCaseResult, folder: str | Path) -> Path:
    """Write a fitted map into ``folder``: its blocks, its normalisation, then ``manifest.json``
    (config, networks, event shape, assessment, history; the commit record). Other fields of an
    existing worst-case manifest there (settings, phases) are kept."""
    store = WorstCaseFolder(folder)
    if (store.path / MANIFEST).is_file():
        m = read_manifest(store.path, KIND, "folder")
        store.record = {k: v for k, v in m.items() if k not in _HEADER}
    flow = result.map.flow
    networks = store.save_blocks(flow, list(range(flow.num_blocks)))
    store.commit(
        "map",
        {"blocks_done": flow.num_blocks, "done": True},
        config=result.config.to_json(),
        event_shape=list(flow.event_shape),
        networks=networks,
        train=result.train.to_json(),
        history=result.history,
        seconds=result.seconds,
    )
    return store.path


def load_worst_case(folder: str | Path, *, device: str = "cpu") -> WorstCaseResult:
    """Load a map that :func:`save_worst_case` or a fit into a folder wrote (also the ``dro.json``
    folders of earlier versions). Never unpickles; mismatches, a folder whose map is not finished
    and a folder of a newer format raise InputError naming ``run``."""
    path = Path(folder)
    if (path / MANIFEST).is_file() or not (path / LEGACY_RECORD).is_file():
        meta = read_manifest(path, KIND, "run")
        source = MANIFEST
    else:
        meta = load_json(path / LEGACY_RECORD, "run")
        check_format(meta, "run", str(path))
        source = LEGACY_RECORD
    if not isinstance(meta, dict) or not {"config", "networks", "event_shape", "train"} <= set(
        meta
    ):
        fail("run", f"{source} must hold a finished map (config, networks, event_shape and train); "
             "re-run the fit to finish it", str(path))  # fmt: skip
    config = DROConfig.from_json(meta["config"])
    flow = load_flow(RunDir(path), meta["networks"], meta["event_shape"],
                     dtype=DTYPES[config.dtype], device=device, source=source)  # fmt: skip
    return WorstCaseResult(
        WorstCaseMap(flow, config.spec),
        config,
        assessment_from_json(meta["train"]),
        list(meta.get("history", [])),
        float(meta.get("seconds", 0.0)),
    )


def assessment_from_json(d: dict[str, Any]) -> Assessment:
    """The :class:`Assessment` of a record (derived keys such as ``risk_increase`` are dropped)."""
    known = {f.name for f in dataclasses.fields(Assessment)}
    return Assessment(**{k: v for k, v in d.items() if k in known})
