"""Extra CLI commands. Each module here defines ``register(app: typer.Typer) -> None``; the CLI calls
it for every module, so a feature adds its commands without editing :mod:`iterflow.cli`."""

import importlib
import pkgutil
from typing import Any


def register_all(app: Any) -> None:
    for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{m.name}").register(app)
