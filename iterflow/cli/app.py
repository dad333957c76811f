"""The ``iterflow`` command line: parsing and dispatch only.

Exit codes: 0 success; 2 bad input (one line naming the argument, the rule and the value; no
traceback); 1 internal error (traceback, with a hint to report it); 130 interrupted (resume by running
the same command again).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import typer

from iterflow.cli import config_file, images, reflow, score, transport, worst_case
from iterflow.cli.options import cli_error, parse_hidden
from iterflow.cli.ui import (
    interrupted,
    make_console,
    open_tensorboard,
    train_with_progress,
    write_report,
)
from iterflow.core.denormals import flush_denormals
from iterflow.errors import InputError, fail
from iterflow.train import TrainConfig

_D = TrainConfig()  # the CLI's defaults are the library's
_PER_METHOD = " [default: the method's recommendation, see `iterflow methods`]"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Flow-based generative models as iterative algorithms in probability space.",
)


# Folders written by the command modules, for `iterflow info`: kind -> the JSON file that marks them
# (filled below from each command module's FOLDER_KINDS).
FOLDER_KINDS: dict[str, str] = {}


@app.command()
@config_file.reads_config
def train(
    cli: typer.Context,
    method: str = typer.Option(_D.method, help="Training method: fm, cnf, jko, local-fm, ..."),
    data: str = typer.Option(_D.data, help="Data set name or path to .npy/.csv/.png."),
    out: Path = typer.Option(
        Path("runs/default"), help="Run folder (resumed if it holds the same config)."
    ),
    steps: int | None = typer.Option(
        None, help=f"Optimiser steps per stage (per block for progressive methods).{_PER_METHOD}"
    ),
    blocks: int | None = typer.Option(None, help=f"Number of blocks in the chain.{_PER_METHOD}"),
    batch_size: int | None = typer.Option(None, help=f"Minibatch size.{_PER_METHOD}"),
    lr: float | None = typer.Option(None, help=f"Peak learning rate (Adam).{_PER_METHOD}"),
    lr_schedule: str = typer.Option(_D.lr_schedule, help="cosine or constant."),
    hidden: str | None = typer.Option(
        None, help=f"Hidden widths of each block's MLP, e.g. 256,256,256.{_PER_METHOD}"
    ),
    activation: str | None = typer.Option(
        None, help=f"silu, tanh, softplus, relu, gelu.{_PER_METHOD}"
    ),
    time_freqs: int | None = typer.Option(
        None, help=f"Fourier frequencies of the time embedding.{_PER_METHOD}"
    ),
    x_freqs: int = typer.Option(
        _D.x_freqs,
        help="Random Fourier features of x in each block's MLP (0: none); they help the network "
        "resolve thin structures (e.g. the img2d tree).",
    ),
    x_scale: float = typer.Option(
        _D.x_scale, help="Standard deviation of their frequencies (cycles per standardised unit)."
    ),
    zero_init: bool = typer.Option(
        _D.zero_init, help="Start each block's output layer at zero (the identity map)."
    ),
    ema: float = typer.Option(_D.ema, help="EMA decay of weights (0 disables)."),
    weight_decay: float = typer.Option(_D.weight_decay),
    grad_clip: float = typer.Option(_D.grad_clip, help="Gradient-norm clip (0 disables)."),
    warm_start: bool = typer.Option(_D.warm_start, help="Initialise block n from block n-1."),
    n_train: int | None = typer.Option(
        None, help=f"Training points (a cap for file-backed data).{_PER_METHOD}"
    ),
    n_val: int = typer.Option(_D.n_val),
    n_test: int = typer.Option(_D.n_test),
    standardize: str = typer.Option(
        _D.standardize, help="Normalisation: auto, dim, scalar or none."
    ),
    network: str = typer.Option(_D.network, help="Velocity network kind (mlp; unet for images)."),
    net_option: list[str] = typer.Option(
        [], "--net-option", help="Network option KEY=VALUE (repeatable)."
    ),
    seed: int = typer.Option(_D.seed),
    device: str = typer.Option(_D.device, help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option(_D.dtype, help="float32 or float64."),
    checkpoint_every: int = typer.Option(
        _D.checkpoint_every, help="Steps between in-stage checkpoints."
    ),
    log_every: int = typer.Option(
        _D.log_every, help="Steps between the lines of log.jsonl (and TensorBoard points)."
    ),
    time_budget: float = typer.Option(
        _D.time_budget,
        help="Seconds of training per stage (0: none): --steps becomes the cap, and the step "
        "count that fits is fixed after the warm-up from the speed measured.",
    ),
    autocast: str = typer.Option(
        _D.autocast,
        help="Mixed precision of the loss: auto (bf16 where measured to help), none, bf16.",
    ),
    compile_: bool = typer.Option(
        _D.compile,
        "--compile/--no-compile",
        help="torch.compile the velocity networks while training.",
    ),
    option: list[str] = typer.Option(
        [], "--option", "-o", help="Method option KEY=VALUE (repeatable); see `iterflow methods`."
    ),
    img2d_dir: str | None = typer.Option(None, help="Folder holding img_rose.png / img_tree.png."),
    labels: bool = typer.Option(
        _D.labels,
        help="Condition on the data set's class labels (moons, pinwheel, 8gaussians, digits8, "
        "fashion-mnist, sklearn:iris, ...): class-conditional sampling with guidance, log p(x|y).",
    ),
    label_column: str = typer.Option(
        _D.label_column,
        help="Column of class labels in a .csv/.npy data file (index, or CSV header name); "
        "implies --labels.",
    ),
    label_dropout: float = typer.Option(
        _D.label_dropout,
        help="Probability of training a row with the null label (for classifier-free guidance).",
    ),
    report: bool = typer.Option(
        True, help="After training write samples.npy, metrics.json and plots."
    ),
    eval_n: int = typer.Option(2000, help="Test points for the report's metrics."),
    tensorboard: Path | None = config_file.tensorboard_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    config_path: Path | None = config_file.config_option(),
    print_config: bool = config_file.print_option(),
) -> None:
    """Train a flow into a run folder (resumes an interrupted run with the same config).

    Settings may come from a TOML file (--config; flags given on the command line win); the run
    folder gets the resolved configuration as config.toml, so `--config RUN --out NEW` trains the
    same run again."""
    from iterflow.io import load_json
    from iterflow.train import TrainConfig

    cfg = TrainConfig.for_method(
        method,
        data=data,
        blocks=blocks,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        ema=ema,
        hidden=None if hidden is None else parse_hidden(hidden),
        activation=activation,
        time_freqs=time_freqs,
        x_freqs=x_freqs,
        x_scale=x_scale,
        zero_init=zero_init,
        warm_start=warm_start,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        standardize=standardize,
        seed=seed,
        device=device,
        dtype=dtype,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        time_budget=time_budget,
        options=config_file.table(cli, "option", option),
        img2d_dir=img2d_dir,
        network=network,
        net_options=config_file.table(cli, "net_option", net_option),
        autocast=autocast,
        compile=compile_,
        labels=labels,
        label_column=label_column,
        label_dropout=label_dropout,
    )
    text = config_file.train_config_text(cli, cfg)
    if print_config:
        print(text, end="")
        return
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
    quiet = quiet or not main_rank
    console = make_console(quiet)
    tb = open_tensorboard(tensorboard, cli) if main_rank else None
    t0 = time.perf_counter()
    result = train_with_progress(cfg, out, quiet, tb)
    console.print(
        f"trained {cfg.method} ({result.flow.num_blocks} block(s)) in {time.perf_counter() - t0:.1f} s "
        f"-> {out}"
    )
    if not main_rank:
        return
    config_file.save_config(out, text)
    if report:
        write_report(out, eval_n, device, console)
    if tb is not None:
        if report:
            tb.add_scalars("metrics", load_json(out / "metrics.json"), 0)
        tb.add_text("config", "```toml\n" + text + "```")
        tb.add_images((out / "plots").glob("*.png"))


@app.command()
def sample(
    run: Path = typer.Argument(..., help="Run folder."),
    n: int = typer.Option(1000, help="Number of samples."),
    out: Path = typer.Option(..., help="Output .npy file."),
    solver: str = typer.Option("dopri5"),
    steps: int = typer.Option(16, help="Fixed steps per block."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    label: str | None = typer.Option(
        None, help="Class to sample (runs trained with --labels): index or class name."
    ),
    guidance: float | None = typer.Option(
        None,
        help="Classifier-free guidance weight w: v(x|null) + w (v(x|y) - v(x|null)); "
        "1 conditional, 0 unconditional, >1 guided.",
    ),
) -> None:
    """Draw samples (in the data's units) and save them as .npy; from one class of a labelled
    run with --label, guided with --guidance."""
    import io as _io

    import numpy as np

    from iterflow.apps.report import sample_run
    from iterflow.io import atomic_write_bytes

    if out.suffix != ".npy":
        fail("--out", "must end in .npy", str(out))
    if n < 1:
        fail("--n", "must be a positive integer", n)
    buf = _io.BytesIO()
    x = sample_run(
        run, n, seed=seed, solver=solver, steps=steps, device=device, label=label, guidance=guidance
    )
    np.save(buf, x)
    atomic_write_bytes(out, buf.getvalue())


@app.command(name="eval")
def eval_cmd(
    run: Path = typer.Argument(
        ...,
        help="Run folder (of `iterflow train`; a transport run or RUN/ratio/<estimator>: "
        "end-point diagnostics on the held-out rows).",
    ),
    data: str | None = typer.Option(
        None, help="Evaluate on another data set of the same dimension."
    ),
    n: int = typer.Option(2000, help="Test points (and samples)."),
    solver: str = typer.Option("dopri5"),
    steps: int = typer.Option(16),
    atol: float = typer.Option(1e-5),
    rtol: float = typer.Option(1e-5),
    divergence: str = typer.Option("auto", help="auto, exact or hutchinson."),
    probes: int = typer.Option(1, help="Hutchinson probes."),
    device: str = typer.Option("cpu"),
    cond_n: int = typer.Option(
        500,
        help="Labelled runs: test rows for cond_nll and gen_classifier_accuracy (one likelihood "
        "per class each; 0 skips them).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Test NLL (nats), entropy floor, W2, MMD, W2 by NFE and per-block figures; for runs trained
    with labels also the conditional NLL -log p(x|y) and the generative classifier's accuracy."""
    from iterflow.apps.report import eval_run
    from iterflow.cli.transport_report import eval_ot_folder, ot_folder_kind

    if ot_folder_kind(run) is not None:  # transport and ratio folders: end-point diagnostics
        m = eval_ot_folder(run, n=n, device=device)
        if as_json:
            print(json.dumps(m))
            return
        for key in ("endpoint_summary", "ratio_summary"):
            if key in m:
                print(m[key])
        print(json.dumps({k: v for k, v in m.items() if not k.endswith("summary")}, indent=2))
        return
    m = eval_run(
        run,
        data=data,
        n=n,
        device=device,
        solver=solver,
        steps=steps,
        atol=atol,
        rtol=rtol,
        divergence=divergence,
        probes=probes,
        cond_n=cond_n,
    )
    if as_json:
        print(json.dumps(m))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{run}")
    t.add_column("metric")
    t.add_column("value")
    for k, v in m.items():
        if k != "per_block":
            t.add_row(k, f"{v:.5g}" if isinstance(v, float) else str(v))
    Console().print(t)


@app.command()
def plot(
    run: Path = typer.Argument(..., help="Run folder."),
    out: Path | None = typer.Option(None, help="Folder for the PNGs (default RUN/plots)."),
    n: int = typer.Option(5000),
    device: str = typer.Option("cpu"),
) -> None:
    """Plots: samples vs data, model density, trajectories, particles after each block, curves."""
    from iterflow.apps.report import plot_run

    for p in plot_run(run, out, n=n, device=device):
        print(p)


@app.command()
def info(
    run: Path = typer.Argument(
        ..., help="Folder of `iterflow train` (and reflow/distill), transport, ratio or worst-case."
    ),
) -> None:
    """Print a folder's kind, format, config and history as JSON (training runs: config, data, blocks,
    per-block history; transport, ratio and worst-case folders: their manifest or config, and
    metrics). A folder of a newer format than this iterflow reads is refused (exit 2)."""
    from iterflow.io import MANIFEST, check_format, load_json, read_manifest
    from iterflow.train import RunDir, load_run

    out: dict[str, Any] | None = None
    manifest = read_manifest(run) if (run / MANIFEST).is_file() else None
    if manifest is not None and manifest["kind"] != "train":
        out = {"kind": manifest["kind"], "format_version": manifest["format_version"]}
        out["config"] = manifest.get("config")
        out["manifest"] = manifest
    elif manifest is None and not (run / "config.json").is_file():
        for kind, marker in FOLDER_KINDS.items():
            if (run / marker).is_file():
                config = load_json(run / marker, "run")
                check_format(config, "run", str(run))
                version = config.get("format_version", 1) if isinstance(config, dict) else 1
                out = {"kind": kind, "format_version": version, "config": config}
                break
    if out is not None:
        if (run / "metrics.json").is_file():
            out["metrics"] = load_json(run / "metrics.json", "run")
        from iterflow.cli.transport_report import info_ot_folder

        info_ot_folder(run, out)  # transport and ratio folders: end-point diagnostics and a line
        print(json.dumps(out, indent=2))
        return
    _, _, meta = load_run(run)  # validates the folder (and names what is missing or corrupt)
    rd = RunDir(run)
    config = load_json(rd.config)
    version = meta.get("format_version", 1)
    out = {"kind": "train", "format_version": version, "config": config, "meta": meta}
    print(json.dumps(out, indent=2))


@app.command()
def methods() -> None:
    """List training methods and their options (pass them with -o KEY=VALUE)."""
    import dataclasses

    from iterflow.methods import METHODS

    for name in METHODS:
        cls = METHODS[name]
        print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls.Options):
            print(f"    {f.name} = {f.default!r}")
        rec = dict(cls.recommended)
        rec_options = rec.pop("options", {})
        if rec or rec_options:
            settings = [f"--{k.replace('_', '-')} {_cli_value(v)}" for k, v in rec.items()]
            settings += [f"-o {k}={_cli_value(v)}" for k, v in rec_options.items()]
            print(f"    recommended (used where not given): {' '.join(settings)}")


def _cli_value(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    return str(v).lower() if isinstance(v, bool) else str(v)


@app.command()
def datasets() -> None:
    """List built-in data sets."""
    from iterflow.data import DATASETS

    for name in DATASETS:
        print(name)


# The command groups of the other modules, registered explicitly (no import side effects).
for _module in (images, reflow, score, transport, worst_case):
    _module.register(app)
    FOLDER_KINDS.update(_module.FOLDER_KINDS)


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"iterflow: warning ({category.__name__}): {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map errors to exit codes (usage errors exit 2 via typer).

    Subnormal floats are flushed to zero first, before PyTorch starts its worker threads, so that
    they inherit it (:mod:`iterflow.core.denormals`; ``ITERFLOW_FLUSH_DENORMALS=0`` turns it off).
    The library's warnings (such as :class:`~iterflow.train.ResumeWarning`) print as one line."""
    flush_denormals()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            app(args=argv, prog_name="iterflow", standalone_mode=True)
    except SystemExit as e:
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except InputError as e:  # the library names Python arguments: show the flags that set them
        shown = cli_error(e, app, sys.argv[1:] if argv is None else argv)
        print(f"iterflow: error: {shown}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print(
            "iterflow: internal error; please report it with the command you ran", file=sys.stderr
        )
        return 1
    return 0
