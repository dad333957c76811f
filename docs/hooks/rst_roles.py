"""mkdocs hook: the docstrings' Sphinx roles (``:class:`~iterflow.train.TrainConfig```), which
Markdown leaves as ``:class:`` before a code span, shown as the code span alone (``~`` keeps the last
component of the name, as Sphinx does)."""

from __future__ import annotations

import re
from typing import Any

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|ref|math):<code>(~?)([^<]*)</code>")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    return ROLE.sub(lambda m: f"<code>{_name(m.group(1), m.group(2))}</code>", html)


def _name(tilde: str, name: str) -> str:
    return name.rsplit(".", 1)[-1] if tilde else name
