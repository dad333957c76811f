"""Configuration files of the commands that train: ``--config FILE`` and ``--print-config``.

A configuration file is TOML whose keys are the command's flags without their dashes
(``--batch-size 512`` is ``batch_size = 512``, ``--no-report`` is ``report = false``, ``--hidden
64,64`` may be written ``hidden = [64, 64]``); the repeatable ``KEY=VALUE`` flags are tables
(``-o gamma=0.5`` is ``gamma = 0.5`` under ``[options]``, ``--net-option`` entries go under
``[net_options]``). For ``iterflow train`` these keys are exactly the fields of
:class:`~iterflow.train.TrainConfig` plus how the command runs (``out``, ``report``, ``eval_n``,
``tensorboard``, ``quiet``).

Precedence: a flag given on the command line wins over the file, the file over the defaults (and,
for ``train``, over the method's recommended settings); tables merge key by key, so ``-o gamma=2``
changes one option of the file's ``[options]``. ``--print-config`` prints the resolved configuration
in this format without training, and every finished run writes it into its folder as
``config.toml``: ``--config RUN`` (or ``RUN/config.toml``) runs it again, with the same config
hash. ``iterflow train --config RUN`` also reads a run folder without ``config.toml`` (its
``config.json``, e.g. a run of :func:`iterflow.fit` or an interrupted one), and ``--config`` takes a
``config.json`` or a training run's ``manifest.json`` too.

How: ``--config`` is an eager option whose callback reads the file, checks every key and the type
of every value (errors name the file and the key), and hands the values to click as the context's
``default_map``: click then fills each flag that is not on the command line from it, so the
command's own code is unchanged. The tables wait in ``ctx.meta`` until the command merges them
with its flags (:func:`table`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import typer

from iterflow.core.coerce import coerce, field_types
from iterflow.errors import InputError, fail
from iterflow.io import atomic_write_bytes, load_json, read_toml, toml_dumps, toml_key, toml_value

#: Repeatable ``KEY=VALUE`` flags (their parameter names) -> the TOML table that holds them.
TABLES = {"option": "options", "net_option": "net_options"}
#: Keys of flags that take comma-separated integers: a TOML array of integers is accepted too.
INT_LISTS = ("hidden", "classifier_hidden")
#: Flags that are not settings (never read from nor written to a file).
NOT_SETTINGS = ("--config", "--print-config", "--help")
#: Settings read from a file but not printed: how progress is shown and where TensorBoard logs (a
#: run started again from its config.toml must not write into the first run's event folder).
NOT_PRINTED = ("quiet", "tensorboard")
#: The file a finished run writes into its folder, and that ``--config RUN`` reads.
FILENAME = "config.toml"
_META = "iterflow.config_file"

F = TypeVar("F", bound=Callable[..., Any])

#: Package folder of the shipped presets (``iterflow/presets/NAME.toml``).
PRESET_FOLDER = "presets"
#: ``--config`` value that lists the presets.
LIST_PRESETS = "list"

CONFIG_HELP = (
    "Read the settings from this TOML file (or a run folder's config.toml), or, for train, from a "
    "shipped preset NAME (`--config list` lists them); flags given here win, -o options merge key "
    "by key."
)
PRINT_HELP = "Print the resolved configuration as TOML (for --config) and exit without training."


def config_option() -> Any:
    """The ``--config`` option (eager: it is read before every other flag)."""
    names = ", ".join(presets())
    text = CONFIG_HELP.replace("preset NAME", f"preset NAME ({names})") if names else CONFIG_HELP
    return typer.Option(None, "--config", help=text, is_eager=True, callback=_load)


def tensorboard_option() -> Any:
    """The ``--tensorboard DIR`` option of the training commands."""
    return typer.Option(
        None, help="Also log to TensorBoard in this folder (needs the tensorboard package)."
    )


def print_option() -> Any:
    """The ``--print-config`` flag."""
    return typer.Option(False, "--print-config", help=PRINT_HELP)


def reads_config(fn: F) -> F:
    """Decorate a command that takes ``--config``: an :class:`~iterflow.errors.InputError` about a
    setting that came from the file names the file and its key (``run.toml: steps``) instead of the
    flag, which the user did not type. The command must take a ``typer.Context`` argument."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            ctx = next((v for v in kwargs.values() if hasattr(v, "get_parameter_source")), None)
            raise (from_file(e, ctx) if ctx is not None else e) from None

    return cast(F, command)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def presets() -> dict[str, Path]:
    """Name -> file of every preset shipped in the package (``iterflow/presets/NAME.toml``)."""
    from importlib.resources import files

    folder = Path(str(files("iterflow").joinpath(PRESET_FOLDER)))
    found = {p.stem: p for p in folder.glob("*.toml")} if folder.is_dir() else {}
    return dict(sorted(found.items()))  # by name


def is_preset_name(value: str) -> bool:
    """Whether ``--config value`` reads as a preset name: no path separator, no suffix, and no
    file or folder of that name exists (an existing file always wins)."""
    p = Path(value)
    return not any(c in value for c in "/\\") and not p.suffix and not p.exists()


def resolve_preset(name: str) -> Path:
    """The file of the shipped preset ``name``.

    Raises:
        InputError: naming ``--config`` with the known presets for an unknown name.
    """
    known = presets()
    if name not in known:
        listing = ", ".join(known) or "none"
        fail(
            "--config",
            f"must be an existing TOML file, a run folder or a preset name (presets: {listing}; "
            f"`--config {LIST_PRESETS}` describes them)",
            name,
        )
    return known[name]


def preset_listing() -> str:
    """One line per shipped preset: its name and the first comment line of its file."""
    lines = []
    for name, path in presets().items():
        first = next(
            (ln.lstrip("# ").strip() for ln in path.read_text("utf-8").splitlines() if ln), ""
        )
        about = first.split(":", 1)[1].strip() if ":" in first else first
        lines.append(f"{name}: {about}")
    return "\n".join(lines)


def read_config(path: Path, command: str) -> tuple[dict[str, Any], Path]:
    """The settings in ``path`` and the file they were read from.

    ``path`` is a TOML file, a run folder (its :data:`FILENAME`; for ``train`` also its
    ``config.json``), or, for ``train``, a ``config.json`` or ``manifest.json`` of a training run,
    or the name of a shipped preset (:func:`presets`; a name without path separator or suffix
    that is not an existing file). JSON nulls are left out (unset).
    """
    if command == "train" and is_preset_name(str(path)):
        path = resolve_preset(str(path))
    if path.is_dir():
        if (path / FILENAME).is_file():
            path = path / FILENAME
        elif command == "train" and (path / "config.json").is_file():
            path = path / "config.json"
        else:
            fail("--config", f"must be a TOML file or a run folder holding {FILENAME}", str(path))
    if path.suffix.lower() != ".json":
        return read_toml(path, "--config"), path
    if command != "train":
        fail(
            "--config", f"must be a TOML file (a run folder's {FILENAME}) for {command}", str(path)
        )
    data = load_json(path, "--config")
    if isinstance(data, dict) and "kind" in data:  # a manifest: its config
        if data.get("kind") != "train" or not isinstance(data.get("config"), dict):
            fail("--config", "must be the manifest.json of a training run", str(path))
        data = data["config"]
    if not isinstance(data, dict):
        fail("--config", "must hold a JSON object of settings", str(path))
    return {k: v for k, v in data.items() if v is not None}, path


def setting_keys(command: Any) -> dict[str, Any]:
    """File key -> click parameter of every setting of ``command`` (a click command): the long flag
    without its dashes, ``-`` -> ``_`` (``--no-report`` is the key ``report``); the repeatable
    ``KEY=VALUE`` flags are the tables of :data:`TABLES`."""
    out = {}
    for p in command.params:
        if getattr(p, "param_type_name", "") != "option" or set(p.opts) & set(NOT_SETTINGS):
            continue
        long = [o for o in p.opts if o.startswith("--")]
        key = TABLES.get(p.name) or (long[0][2:] if long else p.name).replace("-", "_")
        out[key] = p
    return out


def _load(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--config``'s callback: check the file's settings and make them the flags' defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    command = ctx.command
    if command.name == "train" and str(value) == LIST_PRESETS and not Path(value).exists():
        typer.echo(preset_listing())
        ctx.exit(0)
    values, source = read_config(Path(value), command.name or "")
    keys = setting_keys(command)
    annotations = _annotations(command)
    defaults: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, v in values.items():
        where = f"{source.name}: {key}"
        p = keys.get(key)
        if p is None:
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            fail(where, f"is not a setting of `iterflow {command.name}`{hint} (`iterflow "
                        f"{command.name} --print-config` prints them all)", v)  # fmt: skip
        if p.name in TABLES:
            if not isinstance(v, Mapping):
                fail(where, f"must be a table ([{key}] with KEY = VALUE lines)", v)
            tables[p.name] = dict(v)
        else:
            defaults[p.name] = _flag_value(v, annotations.get(p.name, Any), key, where)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_META] = {
        "source": source,
        "tables": tables,
        "keys": {p.name: k for k, p in keys.items()},
    }
    return value


def _annotations(command: Any) -> dict[str, Any]:
    """Parameter name -> annotation of the Python function behind ``command``."""
    fn = getattr(command, "callback", None)
    try:
        return field_types(inspect.unwrap(fn)) if fn is not None else {}
    except Exception:  # noqa: BLE001  # unresolvable annotations: no type checks beyond click's
        return {}


def _flag_value(value: Any, annotation: Any, key: str, where: str) -> Any:
    """A file's value as the default of its flag, checked against the flag's type (a file has no
    null: ``int | None`` reads an integer)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = kinds[0] if len(kinds) == 1 else annotation
    if annotation in (str, Path):
        if key in INT_LISTS and isinstance(value, list):
            return ",".join(str(coerce(x, int, where, text=False)) for x in value)
        return coerce(value, str, where, text=False)
    if annotation is Any:
        return value
    return coerce(value, annotation, where, text=False)


# ------------------------------------------------------------------------------------------------
# Using
# ------------------------------------------------------------------------------------------------


def table(ctx: typer.Context, name: str, items: list[str]) -> dict[str, Any]:
    """The ``KEY=VALUE`` flag ``name`` (``option``) as a mapping: the file's table, updated key by
    key by the flags on the command line (``-`` in keys read as ``_``)."""
    from iterflow.cli.options import parse_key_values

    file_table = ctx.meta.get(_META, {}).get("tables", {}).get(name, {})
    return {**{k.replace("-", "_"): v for k, v in file_table.items()}, **parse_key_values(items)}


def from_file(err: InputError, ctx: Any) -> InputError:
    """``err`` naming the file and key when its argument is a setting the file gave (and the
    command line did not): ``steps`` or ``--steps`` -> ``run.toml: steps``; ``option 'gamma'`` ->
    ``run.toml: options.gamma``."""
    info = ctx.meta.get(_META) if ctx is not None else None
    if not info:
        return err
    source, names = info["source"].name, info["keys"]
    for table_param, label in (("option", "option"), ("net_option", "net option")):
        entries = info["tables"].get(table_param, {})
        for key in entries:
            if err.argument == f"{label} {key!r}" and not _on_command_line(ctx, table_param, key):
                return InputError(f"{source}: {TABLES[table_param]}.{key}", err.rule, err.value)
    for p in ctx.command.params:
        if p.name not in names or p.name in TABLES:
            continue
        if err.argument == p.name or err.argument in p.opts:
            if _source(ctx, p.name) == "DEFAULT_MAP":
                return InputError(f"{source}: {names[p.name]}", err.rule, err.value)
    return err


def _source(ctx: Any, name: str) -> str:
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", "")


def _on_command_line(ctx: Any, table_param: str, key: str) -> bool:
    from iterflow.cli.options import parse_key_values

    if _source(ctx, table_param) != "COMMANDLINE":
        return False
    return key in parse_key_values(ctx.params.get(table_param) or [])


# ------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------


def config_text(
    ctx: typer.Context,
    settings: Mapping[str, Any] | None = None,
    tables: Mapping[str, Mapping[str, Any]] | None = None,
    defaults: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The resolved configuration of the command ``ctx`` runs, as TOML that ``--config`` reads.

    Arguments:
        settings: resolved values that are not the flags' own (``train``: every
            :class:`~iterflow.train.TrainConfig` field, the method's recommendations filled in);
            the other flags are written with the values the command runs with.
        tables: table name (``options``) -> its resolved entries.
        defaults: table name -> entries left at their defaults, written as comments.
    """
    from iterflow._version import __version__

    command = ctx.command.name
    resolved = dict(settings or {})
    top: dict[str, Any] = {}
    for key, p in setting_keys(ctx.command).items():  # in the order of the command's flags
        if p.name in TABLES or p.name in NOT_PRINTED:
            continue
        value = resolved.pop(key) if key in resolved else ctx.params.get(p.name)
        if key in INT_LISTS and isinstance(value, str):
            value = [int(v) for v in value.split(",") if v.strip()]
        top[key] = str(value) if isinstance(value, Path) else value
    top.update(resolved)  # settings without a flag of their own (none at present)
    header = (
        f"iterflow {command} configuration (iterflow {__version__}).\n"
        f"Run it with `iterflow {command} --config FILE`: flags given on the command line win"
        + (",\n-o KEY=VALUE flags change single entries of [options]." if tables else ".")
    )
    text = toml_dumps(top, header=header)
    for name, entries in (tables or {}).items():
        text += f"\n[{toml_key(name)}]\n"
        for k, v in entries.items():  # TOML has no null: an unset entry is a comment
            text += (
                f"# {toml_key(k)}: unset\n" if v is None else f"{toml_key(k)} = {toml_value(v)}\n"
            )
        for k, v in (defaults or {}).get(name, {}).items():
            text += f"# {toml_key(k)} = {toml_value(v)}  (default)\n"
    return text


def train_config_text(ctx: typer.Context, cfg: Any) -> str:
    """``iterflow train``'s resolved configuration: every field of the
    :class:`~iterflow.train.TrainConfig` ``cfg`` (the method's recommendations filled in), how the
    command runs, and ``[options]`` with the options the config sets; the method's other options
    follow as comments with their defaults (they are not part of the config, so that the file gives
    the run's config hash)."""
    from iterflow.methods import METHODS, options_record, parse_options

    settings = {k: v for k, v in cfg.to_json().items() if k not in ("options", "net_options")}
    defaults = options_record(parse_options(METHODS[cfg.method], {}))
    unset = {k: v for k, v in defaults.items() if k not in cfg.options}
    tables = {"options": cfg.options, "net_options": cfg.net_options}
    return config_text(ctx, settings, tables, {"options": unset})


def save_config(folder: Path, text: str) -> Path:
    """Write ``text`` as the run folder's :data:`FILENAME` (atomically)."""
    path = folder / FILENAME
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
