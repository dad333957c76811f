"""The run folder of :func:`iterflow.train.train`: creating or resuming it, committing each stage,
and reading its committed record (:func:`iterflow.train.load_run` loads the flow back).

Layout (folder format 2, :data:`iterflow.io.FORMAT_VERSION`): ``config.json`` (the typed
:class:`~iterflow.train.TrainConfig`), ``normalization.safetensors``,
``blocks/block_XXX.safetensors``, ``particles.safetensors`` (cache of the pushed particles),
``progress.*`` (inside a stage), ``log.jsonl``, ``meta.json`` and ``manifest.json``. A stage is
committed by writing its blocks and particles, then ``meta.json`` (what format-1 readers read), then
``manifest.json`` last: ``kind: "train"``, the format version, the config, the data description,
the normalisation's shapes, the networks, ``stages_done`` and the per-stage history. Folders of
format 1 (no manifest: ``meta.json`` is their commit record) still load and resume; a folder of a
newer format is refused.
"""

from __future__ import annotations

from typing import Any

from iterflow.core import distributed as ddp
from iterflow.errors import InputError, fail
from iterflow.io import (
    FORMAT_VERSION,
    RunDir,
    load_json,
    read_record,
    save_json,
    write_manifest,
)
from iterflow.train.config import RUNTIME_KEYS, TrainConfig, config_hash

KIND = "train"
"""The ``kind`` of a training run's manifest."""

_MANIFEST_ONLY = ("kind", "config")  # manifest fields that meta.json does not repeat


def read_meta(run: RunDir, argument: str = "run") -> dict[str, Any] | None:
    """The run's committed record as a ``meta.json`` dict (from ``manifest.json``, or from the
    ``meta.json`` of a format-1 folder); ``None`` when nothing has been committed yet.

    Raises:
        InputError: naming ``argument`` for a corrupt record, a folder of another kind or of a newer
            format than :data:`~iterflow.io.FORMAT_VERSION`.
    """
    record = read_record(run.path, KIND, legacy=run.meta.name, argument=argument)
    if record is None:
        return None
    for key in ("networks", "event_shape", "stages_done", "history"):
        if key not in record:
            fail(argument, f"the run's record must hold {key!r}", str(run.path))
    return {k: v for k, v in record.items() if k not in _MANIFEST_ONLY}


def commit(run: RunDir, cfg: TrainConfig, meta: dict[str, Any]) -> None:
    """Commit the run's state: ``meta.json``, then ``manifest.json`` (written last: the record that
    makes the blocks and particles written before it count). Both carry this version's format."""
    from iterflow._version import __version__

    meta["format_version"], meta["iterflow_version"] = FORMAT_VERSION, __version__
    save_json(run.meta, meta)
    fields = {k: v for k, v in meta.items() if k not in ("format_version", "iterflow_version")}
    write_manifest(run.path, KIND, config=cfg.to_json(), **fields)


def prepare_run_dir(
    run: RunDir, cfg: TrainConfig, resume: bool, ctx: ddp.DistContext | None = None
) -> dict[str, Any] | None:
    """Create the folder ``run`` (argument ``out``), or return its committed meta when resuming a
    run of the same config (``None`` when it has not committed a stage yet).

    Under data-parallel training every rank validates the folder, then rank 0 alone creates it.

    Raises:
        InputError: naming ``out`` when it is a file, a non-empty folder that is not a run, a run
            of another config (or of a newer format), or a run and ``resume`` is false.
    """
    if run.path.exists() and not run.path.is_dir():
        fail("out", "must be a folder (new, empty, or a run to resume), not a file", str(run.path))
    if run.config.exists() or run.manifest.exists():
        meta = read_meta(run, "out")  # refuses a newer format before reading its config
        old = load_json(run.config, "out")
        try:
            old_cfg = TrainConfig.from_json(old)
        except (TypeError, InputError) as e:
            fail("out", f"holds a config.json this version cannot read ({e})", str(run.path))
        if config_hash(old_cfg) != config_hash(cfg):
            was = old_cfg.to_json()
            diff = {
                k: (was.get(k), v)
                for k, v in cfg.to_json().items()
                if was.get(k) != v and k not in RUNTIME_KEYS
            }
            fail("out", f"already holds a run with another config {diff}; use a new folder",
                 str(run.path))  # fmt: skip
        if not resume:
            fail("out", "already holds a run; resume it or choose a new folder", str(run.path))
        return meta
    if run.path.exists() and any(run.path.iterdir()):
        fail("out", "must be a new or empty folder, or a run folder to resume", str(run.path))
    ddp.barrier(ctx)  # every rank has seen the folder before rank 0 writes into it
    if ctx is None or ctx.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_json(run.config, cfg.to_json())
    return None
