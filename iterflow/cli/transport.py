"""``iterflow transport`` and ``iterflow ratio``: flow-based optimal transport between two sample
sets and the telescopic density-ratio estimate along it (see :mod:`iterflow.apps.transport` and
:mod:`iterflow.apps.ratio`).

A transport run folder holds ``transport.json`` (options, data, cost, history), ``blocks/``,
``normalization.safetensors``, ``metrics.json``, the ratio estimators under
``ratio/<estimator>/`` and the plots under ``plots/`` (2-D data only): ``trajectories.png``,
``transport.png`` (pushed source vs target) and ``log_ratio.png`` (the estimated ``log q/p`` next to
the truth when both densities are known).
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import typer

from iterflow.errors import InputError, check_choice, fail
from iterflow.train import DTYPES

RATIO_ESTIMATORS = ("telescopic", "classifier", "kde")


# The folders these commands write, for `iterflow info`: kind -> the JSON file that marks them.
FOLDER_KINDS = {"transport": "transport.json", "ratio": "ratio.json"}


def register(app: typer.Typer) -> None:
    """Add the ``transport`` and ``ratio`` commands to the CLI (and their folders to `iterflow info`)."""
    app.command(name="transport")(transport)
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


def _coerce(value: str, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return low in ("1", "true", "yes", "on")
            raise ValueError
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        kind = "comma-separated integers" if isinstance(default, tuple) else type(default).__name__
        fail(f"option {key!r}", f"must be {kind}", value)
    return value


def parse_transport_options(items: list[str], base: dict[str, Any]) -> Any:
    """``TransportOptions`` from the named CLI options ``base``, overridden by ``-o KEY=VALUE``."""
    from iterflow.apps.ot.transport import TransportOptions
    from iterflow.cli.options import parse_key_values

    fields = {f.name: f.default for f in dataclasses.fields(TransportOptions)}
    kwargs = dict(base)
    for key, value in parse_key_values(items).items():
        if key not in fields:
            fail(f"option {key!r}", f"must be one of {sorted(fields)}", key)
        kwargs[key] = _coerce(value, fields[key], key)
    return TransportOptions(**kwargs)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _dataset(spec: str, argument: str, img2d_dir: str | None) -> Any:
    from iterflow.data import get_dataset

    try:
        return get_dataset(spec, img2d_dir=img2d_dir)
    except InputError as e:
        raise InputError(argument, e.rule, e.value) from None


def load_pair(data: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``(source set, target set, source splits, target splits)`` from a run's ``data`` record."""
    from iterflow.data import child_seeds

    src = _dataset(data["source"], "--source", data.get("img2d_dir"))
    tgt = _dataset(data["target"], "--target", data.get("img2d_dir"))
    if src.dim != tgt.dim:
        fail("--target", f"must have the dimension of --source ({src.dim})", tgt.dim)
    s_src, s_tgt = child_seeds(int(data["seed"]), 2)
    sp = src.splits(data["n_train"], 0, data["n_test"], s_src)
    tp = tgt.splits(data["n_train"], 0, data["n_test"], s_tgt)
    return src, tgt, sp, tp


def _truth(src: Any, tgt: Any) -> Any:
    """``x -> log q(x) - log p(x)`` when both data sets have exact densities, else ``None``."""
    if not (src.has_log_prob and tgt.has_log_prob):
        return None
    return lambda x: (tgt.log_prob(x.double()) - src.log_prob(x.double())).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# iterflow transport
# ------------------------------------------------------------------------------------------------


def transport(
    source: str = typer.Option(..., help="Source P: a data set name or a .npy/.csv/.png file."),
    target: str = typer.Option(..., help="Target Q: a data set name or a .npy/.csv/.png file."),
    out: Path = typer.Option(Path("runs/transport"), help="New (or empty) run folder."),
    n_train: int = typer.Option(20_000, help="Training points of each side (caps for files)."),
    n_test: int = typer.Option(2_000, help="Held-out points of each side."),
    blocks: int = typer.Option(2, help="ODE blocks of the flow."),
    hidden: str = typer.Option("128,128,128", help="Hidden widths of each block's MLP."),
    init_steps: int = typer.Option(2000, help="Flow-matching (minibatch-OT) initialisation steps."),
    refine_steps: int = typer.Option(300, help="Relaxed-OT refinement steps (0 skips)."),
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
    intervals: int = typer.Option(
        16, help="Intervals of the telescopic chain (multiple of --blocks)."
    ),
    ratio_steps: int = typer.Option(2000, help="Optimiser steps of the telescopic classifier."),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    img2d_dir: str | None = typer.Option(None, help="Folder holding img_rose.png / img_tree.png."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Optimal transport from P to Q by a flow (kinetic energy + classifier KLs); W2 estimate."""
    from iterflow.apps.ot.transport import fit_transport, save_transport
    from iterflow.cli.options import parse_hidden

    check_choice(dtype, list(DTYPES), "--dtype")
    if isinstance(seed, bool) or seed < 0:
        fail("--seed", "must be a non-negative integer", seed)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail("--out", "must be a new or empty folder", str(out))
    options = parse_transport_options(
        option,
        {
            "blocks": blocks,
            "hidden": parse_hidden(hidden),
            "init_steps": init_steps,
            "refine_steps": refine_steps,
            "gamma": gamma,
            "batch_size": batch_size,
        },
    )
    ratio_opts = (
        _telescopic_options(intervals, ratio_steps, options.blocks) if ratio_estimator else None
    )
    data = {
        "source": _resolved(source),
        "target": _resolved(target),
        "n_train": n_train,
        "n_test": n_test,
        "seed": seed,
        "img2d_dir": img2d_dir,
    }
    src, tgt, sp, tp = load_pair(data)
    dt = DTYPES[dtype]
    x_train, y_train, x_test, y_test = (s.to(dt) for s in (sp.train, tp.train, sp.test, tp.test))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    est = None
    with PhaseProgress(quiet) as prog:
        result = fit_transport(x_train, y_train, options, generator=gen, progress=prog)
        seconds = time.perf_counter() - t0
        data.update({"source_info": src.describe(), "target_info": tgt.describe()})
        save_transport(result, out, {"data": data, "train_seconds": seconds})
        if ratio_opts is not None:
            from iterflow.apps.ot.ratio import fit_telescopic

            est = fit_telescopic(
                result.flow, x_train, y_train, ratio_opts, generator=gen, progress=prog
            )
            est.save(out / "ratio" / "telescopic")
    truth = _truth(src, tgt)
    pushed = result.forward(x_test)
    metrics = _metrics(result, x_test, y_test, pushed, est, truth)
    from iterflow.io import save_json

    save_json(out / "metrics.json", metrics)
    plots = _plots(out, result, x_test, y_test, pushed, est, truth)
    _summary(prog.console, metrics, seconds, out, plots)


def _resolved(spec: str) -> str:
    """Absolute path for an existing file (so that ``iterflow ratio`` works from anywhere)."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_file() else spec


def _telescopic_options(intervals: int, steps: int, blocks: int) -> Any:
    from iterflow.apps.ot.ratio import TelescopicOptions

    if isinstance(intervals, bool) or intervals < 1 or intervals % blocks != 0:
        fail("--intervals", f"must be a positive multiple of --blocks ({blocks})", intervals)
    default = TelescopicOptions().classifier
    return TelescopicOptions(
        intervals=intervals, classifier=dataclasses.replace(default, steps=steps)
    )


def _metrics(
    result: Any,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    pushed: torch.Tensor,
    est: Any,
    truth: Any,
) -> dict[str, Any]:
    """Costs and sample distances of the maps; log-ratio errors of the telescopic estimator ``est``
    (``None``: not fitted) when the densities are known (``truth``, see :func:`_truth`)."""
    from iterflow.metrics import mmd, w2

    pulled = result.backward(y_test)
    m: dict[str, Any] = {
        "w2_sq": result.cost.w2_sq,
        "w2": math.sqrt(max(result.cost.w2_sq, 0.0)),
        **{k: v for k, v in dataclasses.asdict(result.cost).items() if k != "w2_sq"},
        "w2_exact_test": w2(x_test, y_test),
        "w2_pushed_to_target": w2(pushed, y_test),
        "w2_pulled_to_source": w2(pulled, x_test),
        "mmd_pushed_to_target": mmd(pushed, y_test),
        "mmd_pulled_to_source": mmd(pulled, x_test),
    }
    if truth is not None and est is not None:
        from iterflow.apps.ot.ratio import log_ratio_mse

        m["log_ratio_mse_source"] = log_ratio_mse(
            est.log_ratio(x_test.to(est.shift)), truth(x_test)
        )
        m["log_ratio_mse_target"] = log_ratio_mse(
            est.log_ratio(y_test.to(est.shift)), truth(y_test)
        )
    return m


def _bounds(*clouds: torch.Tensor) -> tuple[float, float, float, float]:
    pts = torch.cat([c.double() for c in clouds])
    lo, hi = pts.quantile(0.005, dim=0), pts.quantile(0.995, dim=0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.15
    return (
        float(centre[0]) - half,
        float(centre[0]) + half,
        float(centre[1]) - half,
        float(centre[1]) + half,
    )


def _plots(
    out: Path,
    result: Any,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    pushed: torch.Tensor,
    est: Any,
    truth: Any,
) -> list[Path]:
    """Trajectories, pushed source (``pushed``) vs target and the log-ratio field of ``est`` (when
    fitted) next to ``truth`` (when known); 2-D only."""
    if result.flow.dim != 2:
        return []
    from iterflow.viz import plot_field, plot_samples, plot_trajectories

    plots = out / "plots"
    flow = result.flow
    with torch.no_grad():
        traj = flow.trajectory(x_test[:400], direction="encode", solver="rk4", steps=8)
    paths = [
        plot_trajectories(
            traj,
            plots / "trajectories.png",
            n_show=400,
            title="transport paths: source (blue) -> target (orange)",
        ),
        plot_samples(
            y_test,
            pushed,
            plots / "transport.png",
            title="target (left) and pushed source (right)",
        ),
    ]
    if est is not None:
        paths.append(
            plot_field(
                est.log_ratio,
                plots / "log_ratio.png",
                bounds=_bounds(x_test, y_test),
                resolution=120,
                true_fn=truth,
                title="log q(x)/p(x): telescopic estimate"
                + (" vs truth" if truth is not None else ""),
            )
        )
    return paths


def _summary(console: Any, m: dict[str, Any], seconds: float, out: Path, plots: list[Path]) -> None:
    line = (
        f"W2^2 estimate {m['w2_sq']:.4g} (kinetic), exact W2^2 on test samples "
        f"{m['w2_exact_test'] ** 2:.4g}; W2(T#P, Q) {m['w2_pushed_to_target']:.3g}"
    )
    if "log_ratio_mse_source" in m:
        line += (
            f"; log-ratio MSE on P {m['log_ratio_mse_source']:.4g}, "
            f"on Q {m['log_ratio_mse_target']:.4g}"
        )
    console.print(line)
    console.print(
        f"trained in {seconds:.1f} s -> {out}"
        + (f" (plots: {', '.join(p.name for p in plots)})" if plots else "")
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Evaluate log q(x)/p(x) (q: target, p: source of RUN) at the given points."""
    import numpy as np

    from iterflow.apps.ot.transport import load_transport_meta
    from iterflow.data import load_array

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
    with PhaseProgress(quiet) as prog:
        est = _estimator(run, meta, estimator, steps, prog)
    x = torch.as_tensor(x_np, dtype=est.shift.dtype)
    values = est.log_ratio(x).double().numpy()
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


def _estimator(run: Path, meta: dict[str, Any], kind: str, steps: int, prog: PhaseProgress) -> Any:
    """Load ``RUN/ratio/<kind>``, fitting (and saving) it first when it is missing."""
    from iterflow.apps.ot import ratio as R

    folder = run / "ratio" / kind
    if (folder / R.RATIO_CONFIG).exists():
        return R.load_ratio(folder)
    data = meta.get("data")
    if not isinstance(data, dict) or "source" not in data:
        fail("run", "transport.json must record the data ('data') to fit an estimator", str(run))
    _, _, sp, tp = load_pair(data)
    dt = DTYPES.get(meta.get("dtype", "float32"), torch.float32)
    x, y = sp.train.to(dt), tp.train.to(dt)
    gen = torch.Generator().manual_seed(int(data["seed"]) + 1)
    if kind == "telescopic":
        from iterflow.apps.ot.transport import load_transport

        flow = load_transport(run).flow
        intervals = flow.num_blocks * max(1, round(16 / flow.num_blocks))
        est = R.fit_telescopic(
            flow,
            x,
            y,
            _telescopic_options(intervals, steps, flow.num_blocks),
            generator=gen,
            progress=prog,
        )
    elif kind == "classifier":
        est = R.fit_classifier(
            x,
            y,
            dataclasses.replace(R.ClassifierOptions(), steps=steps),
            generator=gen,
            progress=prog,
        )
    else:
        est = R.fit_kde(x, y)
    est.save(folder)
    return est
