"""``iterflow score RUN --data FILE``: one log-density per row of a file (anomaly scores), exact or
by Hutchinson's estimator with a per-row standard error, in chunks with a progress bar.

Output (``--out``): a ``.npy`` array ``(n,)`` of the values, or ``(n, 2)`` with ``--probes``
(column 0 the value, column 1 its standard error); a ``.csv`` file with the header
``log_density`` (``bits_per_dim`` with ``--bits-per-dim``), plus ``,stderr`` with ``--probes``, and
one line per row. Without ``--out`` the same lines (no header) go to standard output.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from iterflow.errors import InputError, check_positive, fail

_SUFFIXES = (".npy", ".csv")


@contextmanager
def _data_flag(path: Path) -> Iterator[None]:
    """Errors about the rows (the library's ``x``) name ``--data`` and the file."""
    try:
        yield
    except InputError as e:
        if e.argument == "x":
            raise InputError(f"--data {path.name}", e.rule, e.value) from None
        raise


def _lines(values: list[list[float]]) -> str:
    """CSV body: one line per row, shortest round-trip decimal form of each number."""
    return "".join(",".join(repr(v) for v in row) + "\n" for row in values)


def score(
    run: Path = typer.Argument(..., help="Run folder of `iterflow train`."),
    data: Path = typer.Option(
        ...,
        help="Rows to score, in the run's data units: .npy ((n, d) or (n, *shape)) or .csv "
        "(one row per line, optional header).",
    ),
    out: Path | None = typer.Option(
        None,
        help="Output .npy ((n,), or (n, 2) with --probes: value, stderr) or .csv (header "
        "log_density[,stderr]); default: print one value per line.",
    ),
    bits_per_dim: bool = typer.Option(
        False, "--bits-per-dim", help="Report -log p / (d ln 2) (bits/dim) instead of nats."
    ),
    probes: int | None = typer.Option(
        None,
        help="Hutchinson's estimator with K >= 2 probes per row and a per-row standard error "
        "(default: the exact trace).",
    ),
    chunk: int = typer.Option(
        4096, help="Largest batch handed to the solver (rows; rows x probes with --probes)."
    ),
    solver: str = typer.Option("dopri5", help="Solver of the likelihood ODE."),
    steps: int = typer.Option(16, help="Fixed steps per block (fixed-step solvers)."),
    atol: float = typer.Option(1e-5, help="Absolute tolerance of adaptive solvers."),
    rtol: float = typer.Option(1e-5, help="Relative tolerance of adaptive solvers."),
    error_norm: str = typer.Option(
        "rows",
        help="Error control of adaptive solvers: rows (every row meets the tolerance) or batch "
        "(the RMS over a chunk: cheaper, a hard row can miss it).",
    ),
    seed: int = typer.Option(0, help="Seed of the Hutchinson probes."),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Run the velocity networks through torch.compile (seconds of compilation, then "
        "faster exact-trace evaluation of MLP flows).",
    ),
    autocast: str = typer.Option(
        "none",
        help="none or bf16: the velocity networks under bfloat16 autocast (faster on hardware "
        "with bf16 products; per-row error near 1e-3 nats in 2-D; needs --atol/--rtol >= 1e-4).",
    ),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """One log-density per row of a .npy/.csv file (nats, or bits/dim), exact or Hutchinson."""
    import numpy as np
    import torch

    from iterflow.cli.ui import make_console, progress_bar
    from iterflow.data import read_table
    from iterflow.evaluation.score import check_rows, score_rows
    from iterflow.io import atomic_write_bytes
    from iterflow.train import load_run

    if out is not None and out.suffix.lower() not in _SUFFIXES:
        fail("--out", "must end in .npy or .csv", str(out))
    if out is not None and out.is_dir():
        fail("--out", "must be a file path, not a folder", str(out))
    check_positive(seed, "seed", integer=True, allow_zero=True)
    flow, _, _ = load_run(run, device=device)
    arr = read_table(data, argument=f"--data {data.name}")
    with _data_flag(data):
        rows = check_rows(arr, flow.event_shape, "x")  # every row checked before integrating
    console = make_console(quiet)
    t0 = time.perf_counter()
    with progress_bar(console, quiet) as bar, _data_flag(data):
        task = bar.add_task("scoring rows", total=rows.shape[0], info="")

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done)

        result = score_rows(
            flow,
            rows,
            divergence="exact" if probes is None else "hutchinson",
            probes=2 if probes is None else probes,
            bits_per_dim=bits_per_dim,
            chunk=chunk,
            solver=solver,
            steps=steps,
            atol=atol,
            rtol=rtol,
            error_norm=error_norm,
            generator=torch.Generator(device=flow.shift.device).manual_seed(seed),
            progress=advance,
            compile=compile,
            autocast=autocast,
        )
    seconds = time.perf_counter() - t0
    values = result.values.numpy()
    table = (
        values[:, None] if result.stderr is None else np.stack([values, result.stderr.numpy()], 1)
    )
    if out is None:
        sys.stdout.write(_lines(table.tolist()))
        sys.stdout.flush()
    elif out.suffix.lower() == ".npy":
        buf = io.BytesIO()
        np.save(buf, values if result.stderr is None else table)
        atomic_write_bytes(out, buf.getvalue())
    else:
        header = result.name + ("" if result.stderr is None else ",stderr")
        atomic_write_bytes(out, (header + "\n" + _lines(table.tolist())).encode())
    s = result.summary()
    how = "exact trace" if result.probes is None else f"Hutchinson, {result.probes} probes"
    err = "" if s["median_stderr"] is None else f", median stderr {s['median_stderr']:.3g}"
    console.print(
        f"scored {s['n']} rows of {data.name} ({how}): mean {s['mean']:.4f} {s['units']} "
        f"(min {s['min']:.4f}, max {s['max']:.4f}{err}), {s['nfe']} NFE, {seconds:.1f} s"
        f" -> {out if out is not None else 'stdout'}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


FOLDER_KINDS: dict[str, str] = {}


def register(app: typer.Typer) -> None:
    """Add ``score`` to the CLI."""
    app.command(name="score")(score)
