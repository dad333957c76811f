"""Run-folder I/O: atomic writes, JSON metadata, safetensors weights. Loading never unpickles."""

from __future__ import annotations

import json
import os
import sys
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

    def read_log(self) -> list[dict[str, Any]]:
        """The rows of ``log.jsonl`` (a line cut short by a kill is skipped)."""
        return read_jsonl(self.log)


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


# ------------------------------------------------------------------------------------------------
# TOML: configuration files (read with tomllib / tomli, written by the small writer below)
# ------------------------------------------------------------------------------------------------


def read_toml(path: str | Path, argument: str = "config") -> dict[str, Any]:
    """The table in the TOML file ``path`` (``tomllib``; the ``tomli`` package on Python 3.10).

    Raises:
        InputError: naming ``argument`` for a missing or unreadable file or invalid TOML (the
            message gives the line and column).

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "run.toml"
        >>> _ = p.write_text('steps = 100\\n[options]\\ngamma = 0.5\\n')
        >>> read_toml(p)
        {'steps': 100, 'options': {'gamma': 0.5}}
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, packaged
        import tomli as tomllib

    path = Path(path)
    if not path.is_file():
        fail(argument, "must be an existing TOML file", str(path))
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        fail(argument, "must be a UTF-8 text file", str(path))
    except tomllib.TOMLDecodeError as e:
        fail(argument, f"must be valid TOML ({e})", str(path))


def toml_key(key: str) -> str:
    """``key`` as a TOML key: bare when it can be (``batch_size``), quoted otherwise."""
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return _toml_string(key)


def toml_value(value: Any) -> str:
    """A TOML value: booleans, integers, floats (``repr``: read back to the same float, ``inf`` and
    ``nan`` included), strings, paths, arrays (lists and tuples) and inline tables (mappings).

    Raises:
        InputError: naming ``value`` for ``None`` (TOML has no null: leave the key out) or a value
            of another type.

    Example:
        >>> toml_value([1, 2.5, "a", True]), toml_value(1e-05), toml_value({"h": 0.1})
        ('[1, 2.5, "a", true]', '1e-05', '{ h = 0.1 }')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 'inf', '-inf' and 'nan' are TOML too
    if isinstance(value, (str, os.PathLike)):
        return _toml_string(os.fspath(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # NumPy / 0-dim tensor
        return toml_value(value.item())
    fail("value", "must be a bool, number, string, list or mapping to be written as TOML", value)


def toml_dumps(table: Mapping[str, Any], *, header: str = "") -> str:
    """TOML text of ``table``: its plain keys first, then each mapping as a ``[section]`` (nested
    mappings as ``[section.sub]``). Keys whose value is ``None`` are written as a comment (TOML has
    no null; a reader then sees the key unset). ``header`` lines become ``#`` comments on top.

    Example:
        >>> print(toml_dumps({"steps": 100, "img2d_dir": None, "options": {"gamma": 0.5}}), end="")
        steps = 100
        # img2d_dir: unset
        <BLANKLINE>
        [options]
        gamma = 0.5
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    lines += _toml_table(table, ())
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_table(table: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    lines, sections = [], []
    for key, value in table.items():
        if isinstance(value, Mapping):
            sections.append((key, value))
        elif value is None:
            lines.append(f"# {key}: unset")
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value in sections:
        sub = (*path, key)
        lines += ["", "[" + ".".join(toml_key(k) for k in sub) + "]", *_toml_table(value, sub)]
    return lines


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (``ensure_ascii=False`` keeps every non-ASCII
    character as itself, so no surrogate pair is written), DEL escaped as TOML requires."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines log (missing file: none; a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
