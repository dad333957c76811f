"""mkdocs hook: the command-line reference, generated from the CLI itself at every build.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, one section per command of
``iterflow`` (``iterflow.cli.app.app``, the typer application): its usage line, its help text and a
table of its arguments and options with click's own help records (type, default, required). The
marker ``<!-- cli-output: methods -->`` is replaced by what ``iterflow methods`` prints (likewise
``datasets``). Nothing is written by hand, so the reference cannot drift from the commands.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- cli-reference -->"
OUTPUT = re.compile(r"<!-- cli-output: ([a-z-]+) -->")
CODE = re.compile(r"((`+).+?\2)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, reference())
    return OUTPUT.sub(lambda m: output(m.group(1)), markdown)


def reference() -> str:
    """Markdown of every command of the CLI, in the order ``iterflow --help`` lists them."""
    import typer

    from iterflow.cli.app import app

    root = typer.main.get_command(app)
    parts = []
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        ctx = command.make_context(name, [], resilient_parsing=True)
        usage = " ".join(["iterflow", name, *command.collect_usage_pieces(ctx)])
        parts += [f"### `iterflow {name}`", "", f"```text\n{usage}\n```", ""]
        parts += [_text(p.strip()) + "\n" for p in (command.help or "").split("\n\n")]
        rows = [_row(p, ctx) for p in command.params]
        rows = [r for r in rows if r]
        if rows:
            parts += ["| argument / option | description |", "|---|---|", *rows, ""]
    return "\n".join(parts)


def output(command: str) -> str:
    """What ``iterflow COMMAND`` prints, as a text block."""
    from typer.testing import CliRunner

    from iterflow.cli.app import app

    result = CliRunner().invoke(app, [command], prog_name="iterflow")
    if result.exit_code != 0:
        raise RuntimeError(f"iterflow {command} failed: {result.output}")
    return f"```text\n{result.output.rstrip()}\n```"


def _row(param: Any, ctx: Any) -> str:
    record = param.get_help_record(ctx)
    if record is None:
        return ""
    decl, text = record
    return f"| `{decl}` | {_text(text)} |"


def _text(text: str) -> str:
    """Help text as Markdown: one line, with ``|``, ``*``, ``_``, ``[``, ``<`` and ``\\`` escaped
    outside code spans (```...```) so that the table and the text survive Markdown."""
    text = " ".join(text.replace("\b", "").split())
    out, last = [], 0
    for m in CODE.finditer(text):
        out += [_escape(text[last : m.start()]), m.group(0)]
        last = m.end()
    return "".join([*out, _escape(text[last:])])


def _escape(s: str) -> str:
    s = s.replace("\\", "\\\\").replace("<", "&lt;")
    for c in "|*_[":
        s = s.replace(c, "\\" + c)
    return s
