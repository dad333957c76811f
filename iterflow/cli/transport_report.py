"""The report of ``iterflow transport``: metrics of the maps and the ratio estimate, plots, summary;
and ``iterflow eval`` / ``iterflow info`` on transport and ratio folders (:func:`ot_folder_kind`,
:func:`eval_ot_folder`, :func:`info_ot_folder`): how well the end-point constraints hold."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch


def _dataset(spec: str, argument: str, img2d_dir: str | None) -> Any:
    from iterflow.data import get_dataset
    from iterflow.errors import InputError

    try:
        return get_dataset(spec, img2d_dir=img2d_dir)
    except InputError as e:
        raise InputError(argument, e.rule, e.value) from None


def load_pair(data: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """``(source set, target set, source splits, target splits)`` from a run's ``data`` record."""
    from iterflow.data import child_seeds
    from iterflow.errors import fail

    src = _dataset(data["source"], "--source", data.get("img2d_dir"))
    tgt = _dataset(data["target"], "--target", data.get("img2d_dir"))
    if src.dim != tgt.dim:
        fail("--target", f"must have the dimension of --source ({src.dim})", tgt.dim)
    s_src, s_tgt = child_seeds(int(data["seed"]), 2)
    sp = src.splits(data["n_train"], 0, data["n_test"], s_src)
    tp = tgt.splits(data["n_train"], 0, data["n_test"], s_tgt)
    return src, tgt, sp, tp


def truth_fn(src: Any, tgt: Any) -> Any:
    """``x -> log q(x) - log p(x)`` when both data sets have exact densities, else ``None``."""
    if not (src.has_log_prob and tgt.has_log_prob):
        return None
    return lambda x: (tgt.log_prob(x.double()) - src.log_prob(x.double())).to(x.dtype)


def transport_metrics(
    result: Any,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    pushed: torch.Tensor,
    est: Any,
    truth: Any,
) -> dict[str, Any]:
    """Costs and sample distances of the maps; log-ratio errors of the telescopic estimator ``est``
    (``None``: not fitted) when the densities are known (``truth``, see :func:`truth_fn`). The
    distances are computed on the CPU."""
    from iterflow.apps.ot import log_ratio_mse
    from iterflow.metrics import mmd, w2

    pulled = result.backward(y_test).cpu()
    x_cpu, y_cpu, pushed = x_test.cpu(), y_test.cpu(), pushed.cpu()
    m: dict[str, Any] = {
        "w2_sq": result.cost.w2_sq,
        "w2": math.sqrt(max(result.cost.w2_sq, 0.0)),
        **{k: v for k, v in dataclasses.asdict(result.cost).items() if k != "w2_sq"},
        "w2_exact_test": w2(x_cpu, y_cpu),
        "w2_pushed_to_target": w2(pushed, y_cpu),
        "w2_pulled_to_source": w2(pulled, x_cpu),
        "mmd_pushed_to_target": mmd(pushed, y_cpu),
        "mmd_pulled_to_source": mmd(pulled, x_cpu),
    }
    if truth is not None and est is not None:
        for side, pts in (("source", x_test), ("target", y_test)):
            estimate = est.log_ratio(pts.to(est.shift)).cpu()
            m[f"log_ratio_mse_{side}"] = log_ratio_mse(estimate, truth(pts.cpu()))
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


def transport_plots(
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
        start = x_test[:400].to(flow.shift)
        traj = flow.trajectory(start, direction="encode", solver="rk4", steps=8).cpu()
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
                lambda x: est.log_ratio(x.to(est.shift)).to(x),
                plots / "log_ratio.png",
                bounds=_bounds(x_test, y_test),
                resolution=120,
                true_fn=truth,
                title="log q(x)/p(x): telescopic estimate"
                + (" vs truth" if truth is not None else ""),
            )
        )
    return paths


def print_summary(
    console: Any, m: dict[str, Any], seconds: float, out: Path, plots: list[Path]
) -> None:
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
    for key in ("endpoint_summary", "ratio_summary"):
        if key in m:
            console.print(m[key])
    console.print(
        f"trained in {seconds:.1f} s -> {out}"
        + (f" (plots: {', '.join(p.name for p in plots)})" if plots else "")
    )


# ------------------------------------------------------------------------------------------------
# end-point diagnostics: `iterflow transport` (metrics.json), `iterflow eval` and `iterflow info`
# ------------------------------------------------------------------------------------------------

#: metrics.json keys of :func:`iterflow.apps.ot.diagnostics.endpoint_diagnostics`.
ENDPOINT_KEYS = (
    "kl_pushed_to_target",
    "kl_pulled_to_source",
    "mmd_pushed_to_target",
    "mmd_pulled_to_source",
    "mmd_source_to_target",
    "n_test",
)
#: metrics.json keys of :func:`iterflow.apps.ot.diagnostics.ratio_diagnostics`.
RATIO_KEYS = (
    "log_mean_ratio_source",
    "log_mean_inverse_target",
    "kl_source_target",
    "kl_target_source",
)


def endpoint_metrics(
    result: Any, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    """End-point diagnostics of a fitted transport on its held-out rows ``test`` (classifiers
    trained on ``train``), with their readable line under ``endpoint_summary``. The classifiers
    take the default steps, or the run's own training steps when fewer (never longer than the
    fit)."""
    from iterflow.apps.ot.diagnostics import (
        DiagnosticOptions,
        endpoint_diagnostics,
        endpoint_summary,
    )

    opts = DiagnosticOptions()
    steps = min(opts.classifier.steps, result.options.init_steps + result.options.refine_steps)
    opts = dataclasses.replace(opts, classifier=dataclasses.replace(opts.classifier, steps=steps))
    gen = torch.Generator(train[0].device).manual_seed(seed + 2)
    m: dict[str, Any] = endpoint_diagnostics(result.forward, result.backward, train, test, opts,
                                             generator=gen)  # fmt: skip
    return {**m, "endpoint_summary": endpoint_summary(m)}


def ratio_metrics(est: Any, test: tuple[torch.Tensor, torch.Tensor], truth: Any) -> dict[str, Any]:
    """Normalisation checks of a log-ratio estimate on held-out rows (and its MSE against the
    exact log ratio ``truth`` when known), with their readable line under ``ratio_summary``."""
    from iterflow.apps.ot import log_ratio_mse
    from iterflow.apps.ot.diagnostics import ratio_diagnostics, ratio_summary

    x, y = (t.to(est.shift) for t in test)
    m: dict[str, Any] = {"estimator": est.kind, **ratio_diagnostics(est, x, y)}
    if truth is not None:
        for side, pts in (("source", x), ("target", y)):
            m[f"log_ratio_mse_{side}"] = log_ratio_mse(est.log_ratio(pts).cpu(), truth(pts.cpu()))
    return {**m, "ratio_summary": ratio_summary(m)}


def ot_folder_kind(run: Path) -> str | None:
    """``"transport"`` or ``"ratio"`` for those folders (current or older format), else ``None``."""
    from iterflow.io import MANIFEST, read_manifest

    if (run / MANIFEST).is_file():
        kind = read_manifest(run).get("kind")
        return kind if kind in ("transport", "ratio") else None
    for kind, marker in (("transport", "transport.json"), ("ratio", "ratio.json")):
        if (run / marker).is_file():
            return kind
    return None


def _run_data(run: Path, n: int, device: str) -> tuple[Any, Any, tuple, tuple, int]:
    """The data sets, training rows, first ``n`` held-out rows and seed of a transport run."""
    from iterflow.apps.ot import load_transport_meta
    from iterflow.apps.ot.store import recorded
    from iterflow.errors import fail
    from iterflow.train import DTYPES, resolve_device

    meta = load_transport_meta(run)
    data = recorded(meta, "data")
    if not isinstance(data, dict) or "source" not in data:
        fail("run", "must record its data ('data'; runs of `iterflow transport` do)", str(run))
    src, tgt, sp, tp = load_pair(data)
    dev, dt = resolve_device(device), DTYPES.get(meta.get("dtype", "float32"), torch.float32)
    train = (sp.train.to(dev, dt), tp.train.to(dev, dt))
    test = (sp.test[:n].to(dev, dt), tp.test[:n].to(dev, dt))
    return src, tgt, train, test, int(data["seed"])


def eval_ot_folder(run: Path, *, n: int = 2000, device: str = "cpu") -> dict[str, Any]:
    """``iterflow eval`` on a transport run (costs, sample distances and end-point diagnostics on
    its held-out rows) or on a ratio estimator folder ``RUN/ratio/<estimator>`` of one
    (normalisation checks, the log-ratio MSE when the densities are known, and, for the
    telescopic estimator, the end-point diagnostics of the flow it rests on)."""
    from iterflow.apps.ot import load_ratio, load_transport
    from iterflow.errors import fail

    kind = ot_folder_kind(run)
    if kind == "ratio":
        parent = run.parent.parent
        if ot_folder_kind(parent) != "transport":
            fail("run", "must be a ratio folder RUN/ratio/<estimator> of a transport run (its "
                 "data are the run's)", str(run))  # fmt: skip
        est = load_ratio(run, device=device)
        src, tgt, train, test, seed = _run_data(parent, n, device)
        m = {"kind": "ratio", **ratio_metrics(est, test, truth_fn(src, tgt))}
        if est.kind == "telescopic":
            m.update(endpoint_metrics(load_transport(parent, device=device), train, test, seed))
        return m
    src, tgt, train, test, seed = _run_data(run, n, device)
    result = load_transport(run, device=device)
    pushed = result.forward(test[0])
    m = {"kind": "transport", **transport_metrics(result, test[0], test[1], pushed, None, None)}
    return {**m, **endpoint_metrics(result, train, test, seed)}


def info_ot_folder(run: Path, out: dict[str, Any]) -> None:
    """Add the recorded end-point diagnostics of a transport run (its ``metrics.json``; for a ratio
    folder, those of the run it belongs to) to ``iterflow info``'s ``out`` as ``endpoints``, and
    print their readable lines to stderr."""
    import json
    import sys

    kind = ot_folder_kind(run)
    folder = run if kind == "transport" else run.parent.parent
    path = folder / "metrics.json"
    if kind is None or not path.is_file():
        return
    metrics = json.loads(path.read_text())
    if not isinstance(metrics, dict):
        return
    keys = (*ENDPOINT_KEYS, *RATIO_KEYS, "endpoint_summary", "ratio_summary")
    found = {k: metrics[k] for k in keys if k in metrics}
    if found:
        out["endpoints"] = found
        for k in ("endpoint_summary", "ratio_summary"):
            if k in found:
                print(found[k], file=sys.stderr)
