"""``iterflow transport`` and ``iterflow ratio``: flow-based optimal transport between two sample
sets and the telescopic density-ratio estimate along it (see :mod:`iterflow.apps.ot`).

A transport run folder holds ``manifest.json`` (kind ``transport``: the config with the data and
options, the cost, the per-phase history), ``blocks/``, ``normalization.safetensors``,
``metrics.json``, ``log.jsonl``, the ratio estimators under ``ratio/<estimator>/`` (each with its
``manifest.json``, kind ``ratio``) and the plots under ``plots/`` (2-D data only):
``trajectories.png``, ``transport.png`` (pushed source vs target) and ``log_ratio.png`` (the
estimated ``log q/p`` next to the truth when both densities are known). Training runs on the one loop
(:func:`iterflow.train.optimize`): re-running the same command on the same folder resumes an
interrupted run, also after ``kill -9``, to the result of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import typer

from iterflow.cli import config_file
from iterflow.cli.transport_report import (
    endpoint_metrics,
    load_pair,
    print_summary,
    ratio_metrics,
    transport_metrics,
    transport_plots,
    truth_fn,
)
from iterflow.cli.ui import interrupted, open_tensorboard
from iterflow.errors import InputError, check_choice, fail
from iterflow.train import DTYPES

RATIO_ESTIMATORS = ("telescopic", "classifier", "kde")
AUTOCAST = ("auto", "none", "bf16")

# For `iterflow info`: kind -> the JSON file that marks the folders of earlier versions (folders
# written now are marked by manifest.json, whose "kind" is "transport" or "ratio").
FOLDER_KINDS = {"transport": "transport.json", "ratio": "ratio.json"}


def register(app: typer.Typer) -> None:
    """Add the ``transport`` and ``ratio`` commands to the CLI (and their folders to `iterflow info`)."""
    app.command(name="transport")(config_file.reads_config(transport))
    app.command(name="ratio")(ratio)


class PhaseProgress:
    """A rich progress bar per training phase, fed by ``progress(phase, step, total, terms)``."""

    def __init__(self, quiet: bool) -> None:
        from iterflow.cli.ui import make_console, progress_bar

        self.console = make_console(quiet)
        self.progress = progress_bar(self.console, quiet)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> PhaseProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, phase: str, step: int, total: int, terms: dict[str, float]) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total, info="")
        info = " ".join(f"{k}={v:.4g}" for k, v in list(terms.items())[:4])
        self.progress.update(self.tasks[phase], completed=step, info=info)


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def parse_transport_options(raw: dict[str, Any], base: dict[str, Any]) -> Any:
    """``TransportOptions`` from the named CLI options ``base``, overridden by the ``-o KEY=VALUE``
    entries ``raw`` (text or values, coerced once by each field's annotation)."""
    from iterflow.apps.ot import TransportOptions
    from iterflow.core.coerce import coerce_fields, field_types

    typed = coerce_fields(field_types(TransportOptions), raw, lambda key: f"option {key!r}")
    return TransportOptions(**{**base, **typed})


#: TransportOptions fields that are flags of `iterflow transport` (the others are -o options).
OPTION_FLAGS = ("blocks", "hidden", "init_steps", "refine_steps", "gamma", "batch_size")


def transport_config_text(ctx: typer.Context, options: Any) -> str:
    """The resolved configuration of `iterflow transport`: its flags (the ``TransportOptions``
    ones with the values the run uses) and every other ``TransportOptions`` field in
    ``[options]``."""
    values = options.to_json() if hasattr(options, "to_json") else dataclasses.asdict(options)
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    flags = {k: values[k] for k in OPTION_FLAGS}
    rest = {k: v for k, v in values.items() if k not in OPTION_FLAGS}
    return config_file.config_text(ctx, flags, {"options": rest})


# ------------------------------------------------------------------------------------------------
# iterflow transport
# ------------------------------------------------------------------------------------------------


def transport(
    cli: typer.Context,
    source: str = typer.Option(..., help="Source P: a data set name or a .npy/.csv/.png file."),
    target: str = typer.Option(..., help="Target Q: a data set name or a .npy/.csv/.png file."),
    out: Path = typer.Option(
        Path("runs/transport"), help="Run folder (resumed if it holds the same run)."
    ),
    n_train: int = typer.Option(20_000, help="Training points of each side (caps for files)."),
    n_test: int = typer.Option(2_000, help="Held-out points of each side."),
    blocks: int = typer.Option(2, help="ODE blocks of the flow."),
    hidden: str = typer.Option("128,128,128", help="Hidden widths of each block's MLP."),
    init_steps: int = typer.Option(2000, help="Flow-matching (minibatch-OT) initialisation steps."),
    refine_steps: int = typer.Option(
        0, help="Relaxed-OT refinement steps (0 skips; see --gamma and -o refine_lr)."
    ),
    gamma: float = typer.Option(100.0, help="Weight of the two classifier-estimated KL terms."),
    batch_size: int = typer.Option(256),
    option: list[str] = typer.Option(
        [],
        "--option",
        "-o",
        help="Any TransportOptions field as KEY=VALUE (repeatable), e.g. -o refine_lr=1e-4.",
    ),
    ratio_estimator: bool = typer.Option(
        True, "--ratio/--no-ratio", help="Also fit the telescopic log-ratio estimator."
    ),
    intervals: int | None = typer.Option(
        None,
        help="Intervals of the telescopic chain (multiple of --blocks) [default: the smallest "
        "multiple of --blocks that is at least 2].",
    ),
    ratio_steps: int = typer.Option(2000, help="Optimiser steps of the telescopic classifier."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    autocast: str = typer.Option(
        "auto", help="Mixed precision of the losses: auto (none here), none, bf16."
    ),
    checkpoint_every: int = typer.Option(200, help="Steps between in-phase checkpoints."),
    img2d_dir: str | None = typer.Option(None, help="Folder holding img_rose.png / img_tree.png."),
    tensorboard: Path | None = config_file.tensorboard_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    config_path: Path | None = config_file.config_option(),
    print_config: bool = config_file.print_option(),
) -> None:
    """Optimal transport from P to Q by a flow (kinetic energy + classifier KLs); W2 estimate.

    Re-running the same command on the same folder resumes an interrupted run (also after
    ``kill -9``) to the result of an uninterrupted one; under ``torchrun`` it trains data-parallel.
    Settings may come from a TOML file (--config); the run folder gets the resolved configuration
    as config.toml.
    """
    from iterflow.apps.ot import fit_transport
    from iterflow.cli.options import parse_hidden
    from iterflow.core import distributed as ddp
    from iterflow.train import resolve_device

    check_choice(dtype, list(DTYPES), "--dtype")
    check_choice(autocast, AUTOCAST, "--autocast")
    if autocast == "bf16" and dtype != "float32":
        fail("--autocast", "bf16 needs --dtype float32", autocast)
    if isinstance(seed, bool) or seed < 0:
        fail("--seed", "must be a non-negative integer", seed)
    if out.exists() and not out.is_dir():
        fail("--out", "must be a folder, not a file", str(out))
    options = parse_transport_options(
        config_file.table(cli, "option", option),
        {
            "blocks": blocks,
            "hidden": parse_hidden(hidden),
            "init_steps": init_steps,
            "refine_steps": refine_steps,
            "gamma": gamma,
            "batch_size": batch_size,
        },
    )
    if intervals is None:
        intervals = default_intervals(options.blocks)
    ratio_opts = (
        _telescopic_options(intervals, ratio_steps, options.blocks) if ratio_estimator else None
    )
    text = transport_config_text(cli, options)
    if print_config:
        print(text, end="")
        return
    data: dict[str, Any] = {
        "source": _resolved(source),
        "target": _resolved(target),
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "img2d_dir": img2d_dir,
    }
    dev = resolve_device(device)
    ctx = ddp.setup(dev)
    if ctx is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ctx.local_rank)  # one GPU per process
    main = ctx is None or ctx.is_main  # under torchrun only rank 0 reports and writes
    src, tgt, sp, tp = load_pair(data)
    data.update({"source_info": src.describe(), "target_info": tgt.describe()})
    dt = DTYPES[dtype]
    x_train, y_train = sp.train.to(dev, dt), tp.train.to(dev, dt)
    x_test, y_test = sp.test.to(dev, dt), tp.test.to(dev, dt)
    amp = torch.bfloat16 if autocast == "bf16" else None  # auto: none (ODE and logit gradients)
    run_config = {"data": data, "ratio": ratio_opts.to_json() if ratio_opts else None}
    t0 = time.perf_counter()
    est = None
    tb = open_tensorboard(tensorboard, cli) if main else None
    with PhaseProgress(quiet or not main) as prog, _out_flag():
        progress: Any = prog if tb is None else tb.progress(prog)
        try:
            result = fit_transport(
                x_train, y_train, options, generator=torch.Generator(dev).manual_seed(seed),
                folder=out, progress=progress, ctx=ctx, autocast=amp,
                checkpoint_every=checkpoint_every, extra_config=run_config,
            )  # fmt: skip
            if ratio_opts is not None:
                est = _telescopic(out, result.flow, x_train, y_train, ratio_opts, seed, progress,
                                  ctx, amp, checkpoint_every)  # fmt: skip
        except KeyboardInterrupt:
            raise typer.Exit(interrupted()) from None
    seconds = time.perf_counter() - t0
    if not main:
        return
    truth = truth_fn(src, tgt)
    pushed = result.forward(x_test)
    metrics = transport_metrics(result, x_test, y_test, pushed, est, truth)
    metrics.update(endpoint_metrics(result, (x_train, y_train), (x_test, y_test), seed))
    if est is not None:
        metrics.update({k: v for k, v in ratio_metrics(est, (x_test, y_test), None).items()
                        if k != "estimator"})  # fmt: skip
    from iterflow.io import save_json

    save_json(out / "metrics.json", metrics)
    config_file.save_config(out, text)
    plots = transport_plots(out, result, x_test.cpu(), y_test.cpu(), pushed.cpu(), est, truth)
    print_summary(prog.console, metrics, seconds, out, plots)
    if tb is not None:
        tb.add_scalars("metrics", metrics, 0)
        tb.add_text("config", "```toml\n" + text + "```")
        tb.add_images(plots)


@contextmanager
def _out_flag() -> Iterator[None]:
    """Name ``--out`` in the library's errors about the run folder (``folder``)."""
    try:
        yield
    except InputError as e:
        if e.argument != "folder":
            raise
        raise InputError("--out", e.rule, e.value) from None


def _telescopic(
    out: Path,
    flow: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    options: Any,
    seed: int,
    prog: Any,
    ctx: Any,
    amp: torch.dtype | None,
    checkpoint_every: int,
) -> Any:
    """The telescopic estimator of the run: loaded from ``OUT/ratio/telescopic`` when it is there,
    else fitted into it (resuming an interrupted fit); seeded like `iterflow ratio` fits it."""
    from iterflow.apps.ot import fit_telescopic, load_ratio
    from iterflow.apps.ot.ratio_base import has_estimator

    folder = out / "ratio" / "telescopic"
    if has_estimator(folder):
        return load_ratio(folder, device=x.device)
    gen = torch.Generator(x.device).manual_seed(seed + 1)
    return fit_telescopic(flow, x, y, options, generator=gen, folder=folder, progress=prog,
                          ctx=ctx, autocast=amp, checkpoint_every=checkpoint_every)  # fmt: skip


def _resolved(spec: str) -> str:
    """Absolute path for an existing file (so that ``iterflow ratio`` works from anywhere)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_file() else spec


def default_intervals(blocks: int) -> int:
    """The telescopic chain's default number of intervals for a flow of ``blocks`` blocks: the
    smallest multiple of ``blocks`` that is at least ``TelescopicOptions().intervals``."""
    from iterflow.apps.ot import TelescopicOptions

    want = TelescopicOptions().intervals
    return blocks * max(1, -(-want // blocks))


def _telescopic_options(intervals: int, steps: int, blocks: int) -> Any:
    from iterflow.apps.ot import TelescopicOptions

    if isinstance(intervals, bool) or intervals < 1 or intervals % blocks != 0:
        fail("--intervals", f"must be a positive multiple of --blocks ({blocks})", intervals)
    default = TelescopicOptions().classifier
    return TelescopicOptions(
        intervals=intervals, classifier=dataclasses.replace(default, steps=steps)
    )


# ------------------------------------------------------------------------------------------------
# iterflow ratio
# ------------------------------------------------------------------------------------------------


def ratio(
    run: Path = typer.Argument(..., help="Transport run folder (from `iterflow transport`)."),
    points: Path = typer.Option(..., help="Points to evaluate: a .npy or .csv table (n, d)."),
    out: Path | None = typer.Option(
        None, help="Write the log ratios to this .npy file (default: print one per line)."
    ),
    estimator: str = typer.Option(
        "telescopic",
        help="telescopic, classifier or kde (fitted on "
        "the run's data and cached in RUN/ratio/ on first use).",
    ),
    steps: int = typer.Option(2000, help="Optimiser steps when a classifier must be fitted."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto (fitting and evaluation)."),
    checkpoint_every: int = typer.Option(200, help="Steps between checkpoints of a fit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Evaluate log q(x)/p(x) (q: target, p: source of RUN) at the given points.

    An estimator fitted here is checkpointed in ``RUN/ratio/<estimator>``: re-running the command
    resumes an interrupted fit (also after ``kill -9``) to the uninterrupted result.
    """
    import numpy as np

    from iterflow.apps.ot import load_transport_meta
    from iterflow.core import distributed as ddp
    from iterflow.data import load_array
    from iterflow.train import resolve_device

    check_choice(estimator, RATIO_ESTIMATORS, "--estimator")
    if out is not None and out.suffix != ".npy":
        fail("--out", "must end in .npy", str(out))
    meta = load_transport_meta(run)
    if not points.is_file() or points.suffix.lower() not in (".npy", ".csv"):
        fail("--points", "must be an existing .npy or .csv file", str(points))
    try:
        x_np = load_array(points)
    except InputError as e:
        raise InputError("--points", e.rule, e.value) from None
    dim = int(meta["event_shape"][0])
    if x_np.shape[1] != dim:
        fail("--points", f"must have {dim} columns (the run's dimension)", x_np.shape[1])
    dev = resolve_device(device)
    ctx = ddp.setup(dev)
    if ctx is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", ctx.local_rank)
    main = ctx is None or ctx.is_main
    with PhaseProgress(quiet or not main) as prog:
        try:
            est = _estimator(run, meta, estimator, steps, prog, dev, ctx, checkpoint_every)
        except KeyboardInterrupt:
            raise typer.Exit(interrupted()) from None
    if not main:
        return
    x = torch.as_tensor(x_np, dtype=est.shift.dtype, device=est.shift.device)
    values = est.log_ratio(x).double().cpu().numpy()
    if out is None:
        sys.stdout.write("".join(f"{v:.6g}\n" for v in values))
        return
    from iterflow.io import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, values)
    atomic_write_bytes(out, buf.getvalue())
    prog.console.print(
        f"wrote {len(values)} log ratios ({estimator}) to {out}; mean {values.mean():.4g}"
    )


def _estimator(
    run: Path,
    meta: dict[str, Any],
    kind: str,
    steps: int,
    prog: PhaseProgress,
    device: torch.device,
    ctx: Any,
    checkpoint_every: int,
) -> Any:
    """Load ``RUN/ratio/<kind>``, fitting (and saving) it first when it is missing; a fit resumes
    from its checkpoints in that folder."""
    from iterflow.apps import ot
    from iterflow.apps.ot.ratio_base import has_estimator
    from iterflow.apps.ot.store import recorded

    folder = run / "ratio" / kind
    if has_estimator(folder):
        return ot.load_ratio(folder, device=device)
    data = recorded(meta, "data")
    if not isinstance(data, dict) or "source" not in data:
        fail("run", "must record the data ('data') to fit an estimator", str(run))
    _, _, sp, tp = load_pair(data)
    dt = DTYPES.get(meta.get("dtype", "float32"), torch.float32)
    x, y = sp.train.to(device, dt), tp.train.to(device, dt)
    gen = torch.Generator(device).manual_seed(int(data["seed"]) + 1)
    fit = {"folder": folder, "progress": prog, "ctx": ctx, "checkpoint_every": checkpoint_every}
    if kind == "telescopic":
        flow = ot.load_transport(run, device=device).flow
        intervals = default_intervals(flow.num_blocks)
        options = _telescopic_options(intervals, steps, flow.num_blocks)
        return ot.fit_telescopic(flow, x, y, options, generator=gen, **fit)
    if kind == "classifier":
        options = dataclasses.replace(ot.ClassifierOptions(), steps=steps)
        return ot.fit_classifier(x, y, options, generator=gen, **fit)
    est = ot.fit_kde(x, y)
    if ctx is None or ctx.is_main:
        est.save(folder)
    return est
