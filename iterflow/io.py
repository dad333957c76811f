"""Run-folder I/O: atomic writes, JSON metadata, safetensors weights. Loading never unpickles."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from iterflow.errors import fail

FORMAT_VERSION = 2
"""Format of the folders this version writes; a folder of a higher format is refused on loading.

1: training runs committed by ``meta.json`` (beside ``config.json``); the applications' own JSON.
2: every folder committed by ``manifest.json`` (:func:`write_manifest`), naming its kind; training
runs keep ``config.json`` and ``meta.json`` beside it, so format-1 readers still load them.
"""

MANIFEST = "manifest.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode()
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_json(path: str | Path, argument: str = "run") -> Any:
    """The JSON value in ``path``; a missing, empty or corrupt file raises InputError naming
    ``argument``."""
    path = Path(path)
    if not path.exists():
        fail(argument, "must contain the file " + path.name, str(path))
    try:
        text = path.read_text()
        if not text.strip():
            fail(argument, f"{path.name} must not be empty", str(path))
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(
            argument,
            f"{path.name} must be valid JSON ({e.msg if hasattr(e, 'msg') else e})",
            str(path),
        )


def save_tensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors with safetensors, atomically."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=dict(metadata or {})))


def load_tensors(
    path: str | Path, argument: str = "run", device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Load a safetensors file (no code execution); corrupt or missing files raise InputError."""
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        fail(argument, "must contain the file " + path.name, str(path))
    data = path.read_bytes()
    if not data:
        fail(argument, f"{path.name} must not be empty", str(path))
    try:
        out = load(data)
    except Exception as e:  # safetensors raises its own error types on corrupt headers
        fail(
            argument,
            f"{path.name} must be a valid safetensors file ({type(e).__name__}: {e})",
            str(path),
        )
    return {k: v.to(device) for k, v in out.items()}


class RunDir:
    """Paths and atomic reads/writes of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    meta = property(lambda self: self.path / "meta.json")
    manifest = property(lambda self: self.path / MANIFEST)
    normalization = property(lambda self: self.path / "normalization.safetensors")
    particles = property(lambda self: self.path / "particles.safetensors")
    progress = property(lambda self: self.path / "progress.safetensors")
    progress_meta = property(lambda self: self.path / "progress.json")
    log = property(lambda self: self.path / "log.jsonl")

    def block(self, i: int) -> Path:
        return self.path / "blocks" / f"block_{i:03d}.safetensors"

    def append_log(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            with open(self.log, "a") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """The rows of ``log.jsonl`` (a line cut short by a kill is skipped)."""
        if not self.log.exists():
            return []
        rows = []
        for line in self.log.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def trim_log(self, stage: int, step: int) -> list[dict[str, Any]]:
        """Drop log lines written after the checkpoint we resume from; return the rows kept."""
        keep = [
            r
            for r in self.read_log()
            if r.get("stage", -1) < stage or (r.get("stage") == stage and r.get("step", 0) <= step)
        ]
        if self.log.exists():
            self.log.write_text("".join(json.dumps(r) + "\n" for r in keep))
        return keep


def write_manifest(folder: str | Path, kind: str, **fields: Any) -> Path:
    """Write ``folder/manifest.json`` atomically: the folder's ``kind`` (``"train"``,
    ``"transport"``, ``"ratio"``, ``"worst-case"``, ...), ``format_version``, the library version
    and ``fields`` (JSON values: the typed config, data description, trained networks, history...).

    The manifest is the commit record of a folder: written last, after the files it describes.
    """
    from iterflow._version import __version__

    path = Path(folder) / MANIFEST
    save_json(path, {"kind": kind, "format_version": FORMAT_VERSION,
                     "iterflow_version": __version__, **fields})  # fmt: skip
    return path


def read_manifest(
    folder: str | Path, kind: str | None = None, argument: str = "run"
) -> dict[str, Any]:
    """Read ``folder/manifest.json``, checking its ``kind`` (when given) and format.

    Raises:
        InputError: naming ``argument`` when the folder or manifest is missing or corrupt, of
            another kind, or written by a newer format than this version reads.
    """
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        fail(argument, "must be an existing folder written by iterflow", str(folder))
    if not path.is_file():
        fail(argument, f"must hold {MANIFEST} (is it a folder written by iterflow?)", str(folder))
    m = load_json(path, argument)
    if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
        fail(argument, f"{MANIFEST} must be an object naming the folder's kind", str(path))
    check_format(m, argument, str(folder))
    if kind is not None and m["kind"] != kind:
        fail(argument, f"must be a {kind!r} folder, not a {m['kind']!r} one", str(folder))
    return m


def read_record(
    folder: str | Path, kind: str, *, legacy: str | None = None, argument: str = "run"
) -> dict[str, Any] | None:
    """The commit record of a folder of ``kind``: its ``manifest.json`` (format 2 on), else the
    ``legacy`` JSON file that committed format-1 folders (``meta.json`` for training runs), else
    ``None`` (nothing committed yet). Either is checked against :data:`FORMAT_VERSION`.

    Raises:
        InputError: naming ``argument`` for a corrupt record, another kind, or a newer format.
    """
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        return read_manifest(folder, kind, argument)
    if legacy is None or not (folder / legacy).exists():
        return None
    record = load_json(folder / legacy, argument)
    if not isinstance(record, dict):
        fail(argument, f"{legacy} must be a JSON object", str(folder / legacy))
    check_format(record, argument, str(folder))
    return record


def check_format(record: Any, argument: str, where: str) -> None:
    """Refuse a record (``manifest.json`` or an older ``meta.json``) of a newer format."""
    version = record.get("format_version", 0) if isinstance(record, dict) else 0
    if not isinstance(version, int) or version > FORMAT_VERSION:
        fail(
            argument,
            f"was written in folder format {version} by a newer iterflow (this one reads up to "
            f"{FORMAT_VERSION}); upgrade iterflow",
            where,
        )
