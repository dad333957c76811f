"""``iterflow image-eval RUN``: bits/dim, FD (local classifier features) against NFE,
nearest-training-image distances, a sample grid and a noise-to-image strip of an image run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from iterflow.errors import InputError, fail

#: Library arguments of :class:`ImageEvalOptions` -> the flags that set them.
_OPTION_FLAGS: dict[str, str] = {
    "n_bpd": "--n-bpd",
    "bpd_solver": "--bpd-solver",
    "bpd_steps": "--bpd-steps",
    "bpd_tol": "--bpd-tol",
    "solver": "--solver",
    "tol": "--tol",
    "n_samples": "--n-samples",
    "steps": "--steps",
    "nfes": "--nfe",
    "probes": "--probes",
    "divergence": "--divergence",
    "cache_dir": "--cache-dir",
}


@contextmanager
def _flags(names: dict[str, str]) -> Iterator[None]:
    """Re-raise the library's :class:`InputError` naming the flag instead of the Python argument."""
    try:
        yield
    except InputError as e:
        if e.argument in names:
            raise InputError(names[e.argument], e.rule, e.value) from None
        raise


def _parse_ints(text: str, argument: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(argument, "must be comma-separated positive integers like 1,2,4,8", text)
    if any(v <= 0 for v in vals):
        fail(argument, "must be comma-separated positive integers like 1,2,4,8", text)
    return vals


def image_eval(
    run: Path = typer.Argument(..., help="Run folder of a model trained on an image data set."),
    n_bpd: int = typer.Option(256, help="Test images for bits/dim (0 skips it)."),
    bpd_solver: str = typer.Option("dopri5", help="Solver of the likelihood ODE."),
    bpd_steps: int = typer.Option(16, help="Fixed steps per block (fixed-step solvers)."),
    bpd_tol: float = typer.Option(1e-4, help="atol = rtol of adaptive solvers for bits/dim."),
    divergence: str = typer.Option("hutchinson", help="hutchinson, exact or auto."),
    probes: int = typer.Option(1, help="Hutchinson probes per image."),
    n_samples: int = typer.Option(
        1000, help="Model samples for the Fréchet distance and NN check."
    ),
    solver: str = typer.Option("dopri5", help="Reference sampler."),
    steps: int = typer.Option(16, help="Fixed steps per block of the reference sampler."),
    tol: float = typer.Option(1e-4, help="atol = rtol of an adaptive reference sampler."),
    nfe: str = typer.Option("1,2,4,8,16", help="NFE budgets (Euler) for FD against NFE."),
    classifier_steps: int = typer.Option(800, help="Training steps of the feature classifier."),
    cache_dir: Path | None = typer.Option(
        None,
        help="Classifier cache (default $ITERFLOW_CACHE_DIR/classifiers or ~/.cache/iterflow).",
    ),
    grid: Path | None = typer.Option(
        None, help="PNG of 64 samples (default RUN/plots/samples.png)."
    ),
    trajectory: Path | None = typer.Option(
        None, help="PNG of noise-to-image paths (default RUN/plots/trajectories.png)."
    ),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Image metrics of a run: bits/dim, FD (local classifier features) by NFE, NN distance, grids.

    Writes ``RUN/image_metrics.json`` and the two PNGs.
    """
    # imported here: the evaluation stack (matplotlib, scipy, POT) would slow every other command
    from iterflow.evaluation.feature_classifier import ClassifierConfig
    from iterflow.evaluation.image_eval import ImageEvalOptions, evaluate_image_run
    from iterflow.io import save_json

    with _flags({**_OPTION_FLAGS, "steps": "--classifier-steps"}):
        classifier = ClassifierConfig(steps=classifier_steps)
    with _flags(_OPTION_FLAGS):
        opts = ImageEvalOptions(
            n_bpd=n_bpd,
            bpd_solver=bpd_solver,
            bpd_steps=bpd_steps,
            bpd_tol=bpd_tol,
            divergence=divergence,
            probes=probes,
            n_samples=n_samples,
            solver=solver,
            steps=steps,
            tol=tol,
            nfes=_parse_ints(nfe, "--nfe"),
            seed=seed,
            classifier=classifier,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    plots = Path(run) / "plots"
    out = evaluate_image_run(
        run,
        opts,
        grid=grid or plots / "samples.png",
        trajectory=trajectory or plots / "trajectories.png",
        device=device,
    ).metrics
    save_json(Path(run) / "image_metrics.json", out)
    if as_json:
        print(json.dumps(out))
        return
    _print_table(run, out)


def _print_table(run: Path, m: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{run}")
    t.add_column("metric")
    t.add_column("value")
    if "bits_per_dim" in m:
        b = m["bits_per_dim"]
        t.add_row(
            "bits/dim",
            f"{b['bpd']:.4f} ± {b['stderr']:.4f} ({b['solver']}, {b['divergence']} "
            f"x{b['probes']}, n={b['n']})",
        )
    t.add_row(
        f"{m['fd_label']}",
        f"{m['fd_local_classifier']:.4g} ({m['sampler']['solver']}, "
        f"{m['sampler']['nfe_per_image']} NFE)",
    )
    for k, v in m["fd_local_classifier_by_nfe"].items():
        t.add_row(f"  FD at {k} Euler NFE", f"{v:.4g}")
    t.add_row("  FD test vs train (floor)", f"{m['fd_test_vs_train']:.4g}")
    if m.get("precision") is not None:
        t.add_row(
            f"precision / recall / density / coverage (k={m['prdc_k']})",
            " / ".join(f"{m[k]:.3f}" for k in ("precision", "recall", "density", "coverage")),
        )
    nn = m["nearest_train"]
    t.add_row(
        "NN distance to train (RMS/pixel)",
        f"samples {nn['samples_mean']:.4f}, test {nn['test_mean']:.4f}, ratio {nn['ratio']:.3f}",
    )
    t.add_row(
        "classifier",
        f"{m['classifier']['task']}, val accuracy {m['classifier']['val_accuracy']:.3f}",
    )
    for key in ("grid", "trajectory"):
        if key in m:
            t.add_row(key, m[key])
    Console().print(t)


FOLDER_KINDS: dict[str, str] = {}


def register(app: typer.Typer) -> None:
    """Add ``image-eval`` to the CLI."""
    app.command(name="image-eval")(image_eval)
