"""The report of ``iterflow transport``: metrics of the maps and the ratio estimate, plots, summary."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch


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
    console.print(
        f"trained in {seconds:.1f} s -> {out}"
        + (f" (plots: {', '.join(p.name for p in plots)})" if plots else "")
    )
