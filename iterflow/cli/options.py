"""The command line's parsing of repeatable ``KEY=VALUE`` flags and lists, and the one table that
turns the library's Python argument names into the command line's flags.

Values stay text here: the library coerces them once, by each field's annotated type
(:func:`iterflow.core.coerce.coerce`), wherever they come from.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import typer

from iterflow.errors import InputError, fail

#: Python argument -> flag, where the flag is not the command's parameter of that name (those are
#: found on the command itself: ``batch_size`` -> ``--batch-size``, ``out`` -> ``--out``).
FLAGS: dict[str, str] = {
    "options": "-o",
    "net_options": "--net-option",
    "compile": "--compile",
}
#: Library names of one entry of a mapping argument -> the flag that sets it (``-o gamma``).
ENTRY_FLAGS: dict[str, str] = {"option": "-o", "net option": "--net-option"}
_ENTRY = re.compile(r"(?P<kind>[a-z ]+) '(?P<key>[^']*)'")


def parse_key_values(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the repeatable ``-o`` flags) -> ``{"key": "VALUE"}`` (``-`` -> ``_``)."""
    out = {}
    for item in items:
        if "=" not in item:
            fail("--option", "must look like KEY=VALUE", item)
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def parse_hidden(text: str) -> tuple[int, ...]:
    """``"256,256,256"`` -> ``(256, 256, 256)``; an error names ``--hidden`` otherwise."""
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail("--hidden", "must be comma-separated positive integers like 256,256,256", text)
    if not vals or min(vals) <= 0:
        fail("--hidden", "must be comma-separated positive integers like 256,256,256", text)
    return vals


def invoked_command(root: Any, argv: Sequence[str]) -> Any:
    """The (sub)command ``argv`` runs: ``train`` for ``iterflow train --lr 0``.

    ``root`` is the click command of the typer app (``typer.main.get_command(app)``; typer ships its
    own click, so commands are recognised by their attributes, not by class).
    """
    cmd, args = root, list(argv)
    while isinstance(getattr(cmd, "commands", None), Mapping):
        names = [a for a in args if not a.startswith("-")]
        if not names or names[0] not in cmd.commands:
            break
        cmd = cmd.commands[names[0]]
        args = args[args.index(names[0]) + 1 :]
    return cmd


def command_flags(command: Any) -> dict[str, str]:
    """Parameter name -> flag of each option of ``command`` (the long form where there is one)."""
    out = {}
    for p in getattr(command, "params", []):
        if getattr(p, "param_type_name", "") == "option" and p.name and p.opts:
            long = [o for o in p.opts if o.startswith("--")]
            out[p.name] = (long or p.opts)[0]
    return out


def flag_for(argument: str, flags: Mapping[str, str]) -> str:
    """The command line's name of the library's Python ``argument``: ``lr`` -> ``--lr``,
    ``batch_size`` -> ``--batch-size``, ``option 'gamma'`` -> ``-o gamma``; names the command
    has no flag for (positional arguments such as ``run``, flags already) stay as they are.

    Example:
        >>> flag_for("option 'gamma'", {}), flag_for("batch_size", {"batch_size": "--batch-size"})
        ('-o gamma', '--batch-size')
    """
    entry = _ENTRY.fullmatch(argument)
    if entry and entry["kind"] in ENTRY_FLAGS:
        return f"{ENTRY_FLAGS[entry['kind']]} {entry['key']}"
    if argument in flags:
        return flags[argument]
    return FLAGS.get(argument, argument)


def cli_error(err: InputError, app: Any, argv: Sequence[str]) -> InputError:
    """``err`` with its argument named as the flag of the command ``argv`` runs in the typer
    ``app`` (:func:`flag_for`); ``err`` itself if the command cannot be resolved."""
    try:
        flags = command_flags(invoked_command(typer.main.get_command(app), argv))
    except Exception:  # noqa: BLE001  # reporting an error must not raise another
        return err
    flag = flag_for(err.argument, flags)
    return err if flag == err.argument else InputError(flag, err.rule, err.value)
