"""``iterflow worst-case``: learn a flow that moves a reference distribution to its worst case.

Maximises ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)`` (FlowDRO; Xu, Lee, Cheng, Xie, arXiv 2310.19253)
and compares with per-sample gradient ascent calibrated to the same transport cost. With
``--risk classifier`` the map is conditioned on the points' labels (``--condition auto``, the default):
the held-out points are moved with their own labels (true labels, or the classifier's predictions when
the reference is unlabelled). The run folder gets ``manifest.json`` (the record), the map
(``blocks/``, ``normalization.safetensors``), the classifier when the risk is one,
``metrics.json`` and plots. See :mod:`iterflow.apps.dro`.

Training (the classifier, then the map) runs on the one loop: re-running the same command on the
same folder resumes an interrupted run (also after ``kill -9``) to the result of an uninterrupted
one; it trains data-parallel under ``torchrun`` like ``iterflow train``.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import typer

from iterflow.cli import config_file
from iterflow.errors import InputError, fail

# For `iterflow info`: kind -> the JSON file that marks the folders of earlier versions (folders
# written now are marked by manifest.json, whose "kind" is "worst-case").
FOLDER_KINDS = {"worst-case": "dro.json"}


def register(app: typer.Typer) -> None:
    """Add the ``worst-case`` command to the CLI (and its folders to `iterflow info`)."""
    app.command(name="worst-case")(config_file.reads_config(worst_case))


def worst_case(
    cli: typer.Context,
    reference: str = typer.Option(
        ...,
        help="Reference P: a run folder, a labelled set (moons, circles, "
        "sklearn:digits) or a data set name/file.",
    ),
    risk: str = typer.Option(
        ..., help="classifier, linear:a1,...,ad or quadratic:Q[;b] (Q: 1, d or d*d numbers)."
    ),
    data: str | None = typer.Option(
        None,
        help="Labelled set the classifier is trained on "
        "(default: the reference, when it is a labelled set).",
    ),
    out: Path = typer.Option(
        Path("runs/worst-case"), help="Run folder (resumed if it holds the same config)."
    ),
    gamma: float = typer.Option(1.0, help="Wasserstein budget parameter (larger: farther moves)."),
    blocks: int = typer.Option(1, help="ODE blocks in the map."),
    schedule: str = typer.Option("joint", help="joint or progressive (gamma/blocks per block)."),
    hidden: str = typer.Option("64,64", help="Hidden widths of each block's MLP."),
    activation: str = typer.Option("silu"),
    solver: str = typer.Option("rk4", help="Fixed-step solver: euler, midpoint, heun, rk4."),
    ode_steps: int = typer.Option(8, help="Solver steps per block."),
    kinetic: float = typer.Option(
        0.0, help="Weight of the path-straightness (kinetic) regulariser."
    ),
    steps: int = typer.Option(1000, help="Optimiser steps (per block when progressive)."),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(1e-2, help="Peak learning rate (Adam, cosine schedule)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay of the map's networks."),
    gamma_warmup: float = typer.Option(
        0.6,
        help="Fraction of the steps over which gamma grows geometrically from "
        "gamma * gamma-start to gamma (0: off).",
    ),
    gamma_start: float = typer.Option(1 / 16, help="Starting fraction of gamma of the warm-up."),
    condition: str = typer.Option(
        "auto",
        help="auto: condition the map on the labels for a classifier risk; none: a map of x alone.",
    ),
    n_train: int = typer.Option(1000, help="Training points of P."),
    n_test: int = typer.Option(1000, help="Held-out points of P."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("float32", help="float32 or float64."),
    autocast: str = typer.Option(
        "auto", help="Mixed precision of the objective: auto (none here), none, bf16."
    ),
    checkpoint_every: int = typer.Option(500, help="Steps between in-stage checkpoints."),
    classifier_hidden: str = typer.Option("64,64", help="Hidden widths of the classifier."),
    classifier_steps: int = typer.Option(1500),
    label_smoothing: float = typer.Option(
        0.1, help="Label smoothing of the classifier's training."
    ),
    baseline: bool = typer.Option(
        True, help="Also run the gradient-ascent baseline at equal cost."
    ),
    ascent_steps: int = typer.Option(100, help="Gradient-ascent steps of the baseline."),
    tensorboard: Path | None = config_file.tensorboard_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    config_path: Path | None = config_file.config_option(),
    print_config: bool = config_file.print_option(),
) -> None:
    """Worst-case sampling: a flow map F maximising E R(F(X)) - E|X - F(X)|^2 / (2 gamma).

    Settings may come from a TOML file (--config); the run folder gets the resolved configuration
    as config.toml."""
    from iterflow.apps import dro
    from iterflow.cli.options import parse_hidden
    from iterflow.cli.ui import make_console, open_tensorboard
    from iterflow.core import distributed as ddp
    from iterflow.train import DTYPES, resolve_device

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports and writes
    console = make_console(quiet or not main_rank)
    t0 = time.perf_counter()
    with _flags(out="--out", folder="--out", spec="--risk", name="--data", data="--data"):
        config = dro.DROConfig(
            gamma=gamma, blocks=blocks, schedule=schedule, hidden=parse_hidden(hidden),
            activation=activation, solver=solver, ode_steps=ode_steps, kinetic=kinetic,
            steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
            gamma_warmup=gamma_warmup, gamma_start=gamma_start, condition=condition, seed=seed,
            dtype=dtype, device=device, autocast=autocast, checkpoint_every=checkpoint_every,
        )  # fmt: skip
        with _flags(**{"--hidden": "--classifier-hidden"}):
            clf_hidden = parse_hidden(classifier_hidden)
        settings = {
            "reference": reference, "risk": risk, "data": data, "n_train": n_train,
            "n_test": n_test, "classifier_hidden": list(clf_hidden),
            "classifier_steps": classifier_steps, "label_smoothing": label_smoothing,
        }  # fmt: skip
        text = config_file.config_text(cli)
        if print_config:
            print(text, end="")
            return
        tb = open_tensorboard(tensorboard, cli) if main_rank else None
        dev = resolve_device(device)
        ctx = ddp.setup(dev)
        if ctx is not None and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", ctx.local_rank)  # one GPU per process
        store = dro.WorstCaseFolder(out, write=main_rank, argument="out")
        store.open(config, settings, ctx)
        with _flags(data="--reference", name="--reference", spec="--reference"):
            ref = dro.load_reference(reference, n_train=n_train, n_test=n_test, seed=seed)
        dt = DTYPES[dtype]
        x_train, x_test = ref.train.to(dev, dt), ref.test.to(dev, dt)
        with _Bars(quiet or not main_rank) as bars:
            the_risk, labels_train, labels_test, info = _make_risk(
                risk, ref, data, x_train, x_test, seed=seed, hidden=clf_hidden,
                steps=classifier_steps, label_smoothing=label_smoothing, folder=out,
                checkpoint_every=checkpoint_every, reporter=_shown(bars, "classifier", tb),
            )  # fmt: skip
            if isinstance(the_risk, dro.ClassifierLoss):
                store.commit("classifier", {"done": True, "files": ["classifier.json",
                             "classifier.safetensors"]})  # fmt: skip
                the_risk = dro.ClassifierLoss(the_risk.classifier.to(dt))
            result = dro.fit_worst_case(
                x_train, the_risk, labels=labels_train, config=config, folder=out,
                reporter=_shown(bars, "map", tb),
            )  # fmt: skip
    if not main_rank:
        return
    with torch.no_grad():
        y_test = result.map(x_test, labels_test)
    metrics: dict[str, Any] = {
        "gamma": gamma,
        "reference": ref.source,
        "risk": risk,
        "dim": int(x_train.shape[1]),
        **info,
        "flow": {
            "train": result.train.to_json(),
            "test": dro.assess(x_test, y_test, the_risk, labels_test, gamma).to_json(),
            "seconds": result.seconds,
            "velocity_evaluations_per_sample": _nfe(config),
            "conditioned_on_labels": result.map.num_classes > 0,
        },
    }
    if isinstance(the_risk, (dro.LinearRisk, dro.QuadraticRisk)):
        with torch.no_grad():
            y_train = result.map(x_train)
        metrics["closed_form"] = {
            "relative_rms_error_train": _rel_err(y_train, the_risk, x_train, gamma),
            "relative_rms_error_test": _rel_err(y_test, the_risk, x_test, gamma),
        }
    asc = None
    if baseline:
        asc, metrics["baseline"] = _baseline(
            the_risk,
            x_train,
            x_test,
            labels_train,
            labels_test,
            result.train.transport_cost,
            gamma,
            ascent_steps,
        )
    from iterflow.io import save_json

    save_json(out / "metrics.json", metrics)
    config_file.save_config(out, text)
    plots = _plots(out, ref, x_train, x_test, y_test, labels_test, asc)
    _summary(console, metrics, time.perf_counter() - t0, out, plots)
    if tb is not None:
        tb.add_scalars("metrics", metrics, 0)
        tb.add_text("config", "```toml\n" + text + "```")
        tb.add_images(plots)


def _shown(bars: _Bars, label: str, tb: Any) -> Any:
    """The reporter of one training phase: its progress bar, and TensorBoard when logging."""
    bar = bars.phase(label)
    return bar if tb is None else tb.reporter(bar, prefix=label)


@contextmanager
def _flags(**renames: str) -> Iterator[None]:
    """Name the command's flags in the library's errors: an ``InputError`` naming a Python argument
    is re-raised naming ``renames[argument]``, or ``--argument`` when it is one of this command's
    options (``gamma_warmup`` -> ``--gamma-warmup``); other names pass unchanged."""
    try:
        yield
    except InputError as e:
        options = set(inspect.signature(worst_case).parameters) - {"quiet"}
        flag = renames.get(e.argument)
        if flag is None and e.argument in options:
            flag = "--" + e.argument.replace("_", "-")
        if flag is None:
            raise
        raise InputError(flag, e.rule, e.value) from None


class _Bars:
    """One rich progress bar per training phase: the classifier, then the map (or each block)."""

    def __init__(self, quiet: bool) -> None:
        from iterflow.cli.ui import make_console, progress_bar

        self.progress = progress_bar(make_console(quiet), quiet)

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, label: str) -> _PhaseBar:
        return _PhaseBar(self.progress, label)


class _PhaseBar:
    """The loop's :class:`~iterflow.train.loop.Reporter` for the bars of one phase."""

    def __init__(self, progress: Any, label: str) -> None:
        self.progress, self.label, self.task = progress, label, None

    def stage_start(self, index: int, n_stages: int, total_steps: int, done_steps: int) -> None:
        desc = self.label if n_stages == 1 else f"{self.label} block {index + 1}/{n_stages}"
        self.task = self.progress.add_task(desc, total=total_steps, completed=done_steps, info="")

    def step(self, step: int, terms: dict[str, float]) -> None:
        info = " ".join(f"{k}={v:.4g}" for k, v in list(terms.items())[:4])
        self.progress.update(self.task, completed=step, info=info)

    def stage_end(self, record: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=record.get("steps"))


def _make_risk(
    spec: str,
    ref: Any,
    data: str | None,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    *,
    seed: int,
    hidden: tuple[int, ...],
    steps: int,
    label_smoothing: float,
    folder: Path,
    checkpoint_every: int,
    reporter: Any,
) -> tuple[Any, torch.Tensor | None, torch.Tensor | None, dict[str, Any]]:
    """The risk, the labels of the train/test reference points, and what to record about them.

    A classifier risk trains (or, in a resumed folder, loads) the classifier on ``x_train``'s device."""
    from iterflow.apps import dro

    if spec != "classifier":
        return dro.parse_risk(spec, int(x_train.shape[1])), None, None, {}
    name = data or (ref.source.get("name") if ref.source.get("kind") == "labelled" else None)
    if name is None:
        fail(
            "--data",
            f"must name a labelled set {list(dro.LABELLED_SETS)} for --risk classifier "
            "when --reference is not one",
            data,
        )
    same = ref.data is not None and ref.data.name == name
    ld = ref.data if same else dro.labelled_data(name, x_train.shape[0], x_test.shape[0], seed)
    if ld.train_x.shape[1] != x_train.shape[1]:
        fail(
            "--data",
            f"must have the reference's dimension {x_train.shape[1]}",
            f"{name} ({ld.train_x.shape[1]})",
        )
    dev = x_train.device
    with _flags(hidden="--classifier-hidden", steps="--classifier-steps"):
        clf = dro.train_classifier(
            ld.train_x.to(dev), ld.train_y.to(dev), hidden=hidden, steps=steps,
            label_smoothing=label_smoothing, seed=seed, folder=folder,
            checkpoint_every=checkpoint_every, reporter=reporter,
        )  # fmt: skip
    loss = dro.ClassifierLoss(clf)
    if same:
        y_tr, y_te, how = ld.train_y.to(dev), ld.test_y.to(dev), "true labels"
    else:  # unlabelled reference: attack the classifier's own predictions
        y_tr, y_te, how = (
            loss.predict(x_train.float()),
            loss.predict(x_test.float()),
            "classifier predictions",
        )
    info = {
        "classifier": {
            "data": name,
            "hidden": list(hidden),
            "steps": steps,
            "label_smoothing": label_smoothing,
            "labels": how,
            "train_accuracy": dro.accuracy(clf, ld.train_x.to(dev), ld.train_y.to(dev)),
            "test_accuracy": dro.accuracy(clf, ld.test_x.to(dev), ld.test_y.to(dev)),
        }
    }
    return loss, y_tr, y_te, info


def _nfe(config: Any) -> int:
    from iterflow.core.ode import FIXED_SOLVERS

    return config.blocks * config.ode_steps * len(FIXED_SOLVERS[config.solver].b)


def _rel_err(y: torch.Tensor, risk: Any, x: torch.Tensor, gamma: float) -> float:
    """``sqrt(E|y - F*(x)|^2 / E|F*(x) - x|^2)`` for the map's images ``y = F(x)``, against the
    closed-form map ``F*``."""
    ys = risk.optimal_map(x, gamma)
    return float(
        (((y - ys) ** 2).sum(1).mean() / ((ys - x) ** 2).sum(1).mean().clamp_min(1e-30)).sqrt()
    )


def _baseline(
    risk: Any,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    labels_train: torch.Tensor | None,
    labels_test: torch.Tensor | None,
    target_cost: float,
    gamma: float,
    ascent_steps: int,
) -> tuple[Any, dict[str, Any]]:
    """Gradient ascent calibrated to the flow's training cost; transferred and re-optimised on test."""
    from iterflow.apps import dro

    if target_cost <= 0:
        return None, {"skipped": "the flow did not move (transport cost 0)"}
    asc = dro.calibrate_ascent(
        x_train, risk, target_cost, labels=labels_train, steps=ascent_steps, gamma0=gamma
    )
    transferred = dro.transfer_displacement(x_train, asc.points, x_test)
    reopt = dro.gradient_ascent(
        x_test, risk, gamma=asc.gamma, labels=labels_test, steps=ascent_steps
    )
    return asc, {
        "gamma": asc.gamma,
        "steps": asc.steps,
        "step_size": asc.step_size,
        "adaptive": asc.adaptive,
        "gradient_evaluations_per_sample": asc.gradient_evaluations,
        "train": dro.assess(x_train, asc.points, risk, labels_train, gamma).to_json(),
        "test_transfer": dro.assess(x_test, transferred, risk, labels_test, gamma).to_json(),
        "test_reoptimised": dro.assess(x_test, reopt.points, risk, labels_test, gamma).to_json(),
        "transfer": "nearest training point's displacement",
    }


def _plots(
    out: Path,
    ref: Any,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    labels_test: torch.Tensor | None,
    asc: Any,
) -> list[Path]:
    from iterflow.apps import dro

    plots = []
    if x_test.shape[1] == 2:
        plots.append(
            dro.plot_displacement(
                x_test, y_test, out / "worst_case.png", labels_test, "flow map on held-out points"
            )
        )
        if asc is not None:
            plots.append(
                dro.plot_displacement(
                    x_train,
                    asc.points,
                    out / "baseline.png",
                    None,
                    "gradient ascent (training points)",
                )
            )
    elif ref.data is not None and ref.data.image_shape is not None:
        k = min(32, x_test.shape[0])
        d = ref.data
        plots.append(
            dro.plot_digit_pairs(
                d.to_pixels(x_test[:k].float()),
                d.to_pixels(y_test[:k].float()),
                out / "worst_case_images.png",
                value_range=d.pixel_range,
                title="held-out digits (rows 1, 3, ...) above their worst case",
            )
        )
    return plots


def _summary(console: Any, m: dict[str, Any], seconds: float, out: Path, plots: list[Path]) -> None:
    def line(name: str, a: dict[str, Any]) -> str:
        acc = (
            f", accuracy {a['accuracy_before']:.3f} -> {a['accuracy_after']:.3f}"
            if a.get("accuracy_after") is not None
            else ""
        )
        return (
            f"  {name:<28} cost {a['transport_cost']:.4g}, risk {a['risk_before']:.4g} -> "
            f"{a['risk_after']:.4g}{acc}"
        )

    cond = ", map conditioned on labels" if m["flow"].get("conditioned_on_labels") else ""
    console.print(f"worst case (gamma={m['gamma']}{cond}) in {seconds:.1f} s -> {out}")
    console.print(line("flow, training points", m["flow"]["train"]))
    console.print(line("flow, held-out points", m["flow"]["test"]))
    b = m.get("baseline", {})
    if "train" in b:
        console.print(line(f"ascent (gamma={b['gamma']:.3g}), training", b["train"]))
        console.print(line("ascent, held-out (transfer)", b["test_transfer"]))
        console.print(line("ascent, held-out (re-opt.)", b["test_reoptimised"]))
    if "closed_form" in m:
        console.print(
            f"  closed-form map: relative RMS error {m['closed_form']['relative_rms_error_test']:.3g}"
        )
    if plots:
        console.print("wrote metrics.json, " + ", ".join(p.name for p in plots))
