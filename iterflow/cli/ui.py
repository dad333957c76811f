"""The command line's user interface: the console, progress bars and the reporter that shows training.

Nothing below :mod:`iterflow.cli` imports this module."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from iterflow.train import TrainConfig


def make_console(quiet: bool) -> Any:  # a rich Console (rich is imported lazily)
    """The rich console every command prints its progress and summaries to (stderr; silent if quiet)."""
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def progress_bar(console: Any, quiet: bool) -> Any:
    """The CLI's rich progress bar: description, bar, n/total, a free ``info`` field, elapsed, ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


class RichReporter:
    """Progress bar with loss, steps/s and ETA for each stage."""

    def __init__(self, quiet: bool) -> None:
        self.console = make_console(quiet)
        self.progress = progress_bar(self.console, quiet)
        self.task: Any = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        desc = f"stage {index + 1}/{n_stages}"
        self.task = self.progress.add_task(desc, total=total_steps, completed=done_steps, info="")

    def stage_planned(self, total_steps: int) -> None:
        """A time budget fixed the stage's step count: the bar's new total."""
        self.progress.update(self.task, total=total_steps)

    def step(self, step: int, terms: dict[str, float]) -> None:
        info = " ".join(f"{k}={v:.4g}" for k, v in list(terms.items())[:4])
        self.progress.update(self.task, completed=step, info=info)

    def stage_end(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record.get("steps"))
        keys = ("movement", "kl_proxy", "mmd_to_normal", "seconds")
        shown = " ".join(
            f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), (int, float))
        )
        if record.get("rejected"):
            change = record.get("kl_proxy_change", float("nan"))
            se = record.get("kl_proxy_change_se", float("nan"))
            shown = (f"dropped, the chain ends before it (validation kl_proxy change "
                     f"{change:+.4g} ± {se:.2g}); {shown}")  # fmt: skip
        self.console.print(f"  block(s) {record.get('blocks')}: {shown}")


def train_with_progress(cfg: TrainConfig, out: Path, quiet: bool, tensorboard: Any = None) -> Any:
    """Train ``cfg`` into ``out`` (resuming a run of the same config) with the progress bar; Ctrl-C
    exits with status 130 and the hint to resume. Returns the trainer's result.

    ``tensorboard``: a :class:`~iterflow.train.tensorboard.TensorBoardLog` that also gets the
    progress (``None``: none)."""
    from iterflow.train import train as run_train

    try:
        with RichReporter(quiet) as rep:
            shown = rep if tensorboard is None else tensorboard.reporter(rep)
            return run_train(cfg, out, reporter=shown)
    except KeyboardInterrupt:
        raise typer.Exit(interrupted()) from None


def open_tensorboard(logdir: Path | None, ctx: Any) -> Any:
    """A :class:`~iterflow.train.tensorboard.TensorBoardLog` writing into ``logdir`` (``--tensorboard``),
    closed with the command's click context ``ctx`` (also when training stops with an error or
    Ctrl-C), or ``None`` without ``logdir``. A missing ``tensorboard`` package is an error naming
    the flag."""
    if logdir is None:
        return None
    from iterflow.errors import InputError
    from iterflow.train.tensorboard import TensorBoardLog

    try:
        log = TensorBoardLog(logdir)
    except InputError as e:
        raise InputError("--tensorboard", e.rule, e.value) from None
    ctx.call_on_close(log.close)
    return log


def write_report(out: Path, n: int, device: str, console: Any) -> None:
    """The report every training command writes into its run folder: ``metrics.json`` (``n`` test
    points), ``samples.npy`` (5,000 samples) and the plots; prints a one-line summary."""
    import numpy as np

    from iterflow.apps.report import eval_run, plot_run, sample_run
    from iterflow.io import atomic_write_bytes, save_json

    metrics = eval_run(out, n=n, device=device)
    save_json(out / "metrics.json", metrics)
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, sample_run(out, 5000, device=device))
    atomic_write_bytes(out / "samples.npy", buf.getvalue())
    plots = plot_run(out, device=device)
    ent = metrics.get("entropy")
    console.print(
        f"test NLL {metrics['nll']:.4f} nats"
        + (f" (entropy floor {ent:.4f})" if ent is not None else "")
        + f", W2 {metrics['w2']:.4f}; wrote metrics.json, samples.npy, "
        + ", ".join(p.name for p in plots)
    )


def interrupted() -> int:
    """Tell the user how to resume after Ctrl-C; returns the exit status 130."""
    print(
        "iterflow: interrupted; run the same command again to resume from the last checkpoint",
        file=sys.stderr,
    )
    return 130
