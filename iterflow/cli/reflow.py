"""CLI commands of the rectified-flow toolkit: ``iterflow reflow`` and ``iterflow distill``.

Both read a trained run, simulate its noise-to-data map into (data, noise) pairs and train a new
one-block run (methods ``reflow`` / ``distill``) with the source's data, normalisation and network,
warm-started from its weights. The new run folders work with ``eval``, ``sample``, ``plot`` and
``info``.

``iterflow reflow RUN --out NEW --rounds k`` repeats reflow ``k`` times: ``NEW`` holds the last
round and ``NEW/rounds/round_j`` the earlier ones (each a complete run folder with its
``pairs.safetensors``).
If ``RUN`` is the 1-rectified flow (flow matching with an independent coupling), ``NEW`` is the
``(k + 1)``-rectified flow. Re-running an interrupted command resumes it round by round.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import typer

from iterflow.errors import check_positive, fail


def _source_config(run: Path) -> Any:
    from iterflow.train import load_run

    _, cfg, _ = load_run(run)  # validates the folder (and that its networks load)
    return cfg


def _derived_config(
    src: Any,
    method: str,
    options: dict[str, Any],
    *,
    steps: int,
    batch_size: int | None,
    lr: float | None,
    device: str,
) -> Any:
    """The source's config: data, normalisation and network kept, the training replaced (``steps``
    steps: a time budget of the source, e.g. ``make demo``'s, is not carried over)."""
    return dataclasses.replace(
        src,
        method=method,
        blocks=1,
        steps=steps,
        time_budget=0.0,
        device=device,
        options=options,
        batch_size=batch_size if batch_size is not None else src.batch_size,
        lr=lr if lr is not None else src.lr,
    )


def _pair_options(
    source: Path,
    pairs: Path,
    n_pairs: int,
    pair_solver: str,
    pair_steps: int,
    regenerate_every: int,
    warm_start: bool,
    extra: list[str],
) -> dict[str, Any]:
    from iterflow.cli.options import parse_key_values

    opts: dict[str, Any] = {
        "source": str(source),
        "pairs": str(pairs),
        "n_pairs": n_pairs,
        "pair_solver": pair_solver,
        "pair_steps": pair_steps,
        "regenerate_every": regenerate_every,
        "warm_start": warm_start,
    }
    opts.update(parse_key_values(extra))
    return opts


def _figures(history: list[dict[str, Any]]) -> str:
    rec = history[-1] if history else {}
    keys = ("straightness", "transport_cost", "endpoint_mse", "seconds")
    return " ".join(f"{k}={rec[k]:.4g}" for k in keys if isinstance(rec.get(k), (int, float)))


def _check_new_out(run: Path, out: Path) -> None:
    if out.resolve() == run.resolve():
        fail("--out", "must differ from the source run folder", str(out))


def _claim(out: Path, cfg: Any) -> None:
    """Write the last round's config into ``out`` first, so that earlier rounds can live inside it.

    The trainer then treats ``out`` as a run with that config and no finished stage yet. A folder
    claimed by another command is refused before any round is trained.
    """
    from iterflow.io import load_json, save_json
    from iterflow.train import TrainConfig

    path = out / "config.json"
    if path.exists():
        volatile = ("checkpoint_every", "log_every", "device")
        old = TrainConfig.from_json(load_json(path, "--out")).to_json()
        new = cfg.to_json()
        if any(old[k] != new[k] for k in new if k not in volatile):
            fail("--out", "already holds a run with another config; use a new folder", str(out))
        return
    if out.exists() and any(out.iterdir()):
        fail(
            "--out",
            "must be a new or empty folder, or a reflow by the same command to resume",
            str(out),
        )
    save_json(path, cfg.to_json())


# Options shared by `reflow` and `distill` (typer only reads these declarations).
_PAIR_SOLVER = typer.Option("rk4", help="Solver that simulates the source flow.")
_PAIR_STEPS = typer.Option(32, help="Fixed steps of that solver.")
_REGENERATE_EVERY = typer.Option(0, help="Re-simulate the pairs every N steps (0: offline).")
_BATCH_SIZE = typer.Option(None, help="Minibatch size (default: the source's).")
_LR = typer.Option(None, help="Peak learning rate (default: the source's).")
_DEVICE = typer.Option("cpu", help="cpu, cuda, cuda:N or auto.")
_REPORT = typer.Option(True, help="After training write metrics.json, samples.npy and plots.")
_EVAL_N = typer.Option(2000, help="Test points for the report's metrics.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")


def reflow(
    run: Path = typer.Argument(..., help="Source run folder (e.g. a flow-matching run)."),
    out: Path = typer.Option(
        ..., help="Folder of the last round; earlier rounds go to OUT/rounds/."
    ),
    rounds: int = typer.Option(1, help="Reflow rounds k (RUN 1-rectified -> OUT (k+1)-rectified)."),
    steps: int = typer.Option(2000, help="Optimiser steps per round."),
    n_pairs: int = typer.Option(20_000, help="Simulated (data, noise) pairs per round."),
    pair_solver: str = _PAIR_SOLVER,
    pair_steps: int = _PAIR_STEPS,
    regenerate_every: int = _REGENERATE_EVERY,
    batch_size: int | None = _BATCH_SIZE,
    lr: float | None = _LR,
    warm_start: bool = typer.Option(
        True, help="Start each round from the previous round's weights."
    ),
    option: list[str] = typer.Option([], "--option", "-o", help="Other reflow option KEY=VALUE."),
    device: str = _DEVICE,
    report: bool = _REPORT,
    eval_n: int = _EVAL_N,
    quiet: bool = _QUIET,
) -> None:
    """k-reflow: retrain on the (noise, data) coupling of the previous flow, k times."""
    from iterflow.cli.ui import make_console, train_with_progress, write_report

    check_positive(rounds, "--rounds", integer=True)
    check_positive(steps, "--steps", integer=True)
    _check_new_out(run, out)
    console = make_console(quiet)
    src_cfg = _source_config(run)
    folders = [out / "rounds" / f"round_{j}" for j in range(1, rounds)] + [out]
    sources = [run, *folders[:-1]]
    cfgs = []
    for src, folder in zip(sources, folders, strict=True):
        opts = _pair_options(
            src,
            folder / "pairs.safetensors",
            n_pairs,
            pair_solver,
            pair_steps,
            regenerate_every,
            warm_start,
            option,
        )
        cfgs.append(
            _derived_config(
                src_cfg, "reflow", opts, steps=steps, batch_size=batch_size, lr=lr, device=device
            )
        )
    if rounds > 1:
        _claim(out, cfgs[-1])
    t0 = time.perf_counter()
    for j, (cfg, folder) in enumerate(zip(cfgs, folders, strict=True), start=1):
        result = train_with_progress(cfg, folder, quiet)
        console.print(f"round {j}/{rounds} -> {folder}: {_figures(result.history)}")
    console.print(f"reflow: {rounds} round(s) in {time.perf_counter() - t0:.1f} s -> {out}")
    if report:
        write_report(out, eval_n, device, console)


def distill(
    run: Path = typer.Argument(..., help="Source run folder (e.g. a reflow run)."),
    out: Path = typer.Option(..., help="Run folder of the distilled sampler."),
    k_steps: int = typer.Option(1, help="Euler steps of the distilled sampler."),
    steps: int = typer.Option(2000, help="Optimiser steps."),
    n_pairs: int = typer.Option(20_000, help="Simulated (data, noise) pairs."),
    pair_solver: str = _PAIR_SOLVER,
    pair_steps: int = _PAIR_STEPS,
    regenerate_every: int = _REGENERATE_EVERY,
    fm_weight: float = typer.Option(
        0.1, help="Weight of the flow-matching term on the same pairs."
    ),
    batch_size: int | None = _BATCH_SIZE,
    lr: float | None = _LR,
    warm_start: bool = typer.Option(True, help="Start from the source's weights."),
    option: list[str] = typer.Option([], "--option", "-o", help="Other distill option KEY=VALUE."),
    device: str = _DEVICE,
    report: bool = _REPORT,
    eval_n: int = _EVAL_N,
    quiet: bool = _QUIET,
) -> None:
    """Distil a flow into a k-step Euler sampler (sample it with --solver euler --steps K)."""
    from iterflow.cli.ui import make_console, train_with_progress, write_report

    check_positive(k_steps, "--k-steps", integer=True)
    check_positive(steps, "--steps", integer=True)
    _check_new_out(run, out)
    console = make_console(quiet)
    opts = _pair_options(
        run,
        out / "pairs.safetensors",
        n_pairs,
        pair_solver,
        pair_steps,
        regenerate_every,
        warm_start,
        option,
    )
    opts.update({"k_steps": k_steps, "fm_weight": fm_weight})
    cfg = _derived_config(
        _source_config(run),
        "distill",
        opts,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=device,
    )
    t0 = time.perf_counter()
    result = train_with_progress(cfg, out, quiet)
    console.print(
        f"distilled {run} into a {k_steps}-step sampler in {time.perf_counter() - t0:.1f} s "
        f"-> {out}: {_figures(result.history)}"
    )
    if report:
        write_report(out, eval_n, device, console)


FOLDER_KINDS: dict[str, str] = {}


def register(app: typer.Typer) -> None:
    """Add ``reflow`` and ``distill`` to the ``iterflow`` command line."""
    app.command(name="reflow")(reflow)
    app.command(name="distill")(distill)
