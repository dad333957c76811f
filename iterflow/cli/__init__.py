"""The ``iterflow`` command line (the only layer that knows command-line flags)."""

from iterflow.cli.app import app, main

__all__ = ["app", "main"]
