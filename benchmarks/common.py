"""Helpers shared by the benchmark scripts: machine description and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from iterflow.core.denormals import flush_denormals
from iterflow.data import get_dataset
from iterflow.io import atomic_write_bytes

#: Subnormal floats are flushed to zero in every benchmark process, from its start, so that PyTorch's
#: worker threads inherit it (:mod:`iterflow.core.denormals`; the command line does the same; peers
#: run in the same process get it too). Recorded by :func:`machine`.
FLUSH_DENORMALS = flush_denormals()


def machine() -> dict[str, Any]:
    """CPU model, core count, torch version and threads (printed with every table)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "flush_denormals": FLUSH_DENORMALS,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def checkerboard_model_units(seed: int) -> torch.Tensor:
    """The checkerboard's training split (50,000 rows) standardised, as the trainer sees it: the
    data of the minibatch-OT benchmarks."""
    x = get_dataset("checkerboard").splits(50_000, 10, 10, seed).train
    return (x - x.mean(0)) / x.std(0)


def ot_batches(
    x: torch.Tensor, count: int, n: int, g: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` minibatch-OT problems: ``n`` rows of ``x`` drawn with replacement and as many
    Gaussian noise rows, drawn in that order from ``g``."""
    out = []
    for _ in range(count):
        a = x[torch.randint(0, len(x), (n,), generator=g)]
        out.append((a, torch.randn(n, x.shape[1], generator=g, dtype=x.dtype)))
    return out


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` (nothing when ``path`` is empty), atomically
    (:func:`iterflow.io.atomic_write_bytes`): a killed benchmark leaves the old file or the new."""
    if path:
        atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())
