"""The command line's parsing of repeatable ``KEY=VALUE`` flags and lists."""

from __future__ import annotations

import json
from typing import Any

from iterflow.errors import fail


def parse_key_values(items: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` (the repeatable ``-o`` flags) -> ``{"key": "VALUE"}`` (``-`` -> ``_``)."""
    out = {}
    for item in items:
        if "=" not in item:
            fail("--option", "must look like KEY=VALUE", item)
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = v.strip()
    return out


def parse_net_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; values are parsed as JSON when possible (numbers, lists), else kept as text."""
    out: dict[str, Any] = {}
    for k, v in parse_key_values(items).items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
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
