"""Run-level reports shared by the CLI: evaluation JSON, samples and plots of a run folder."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iterflow.data import get_dataset
from iterflow.errors import check_positive, fail
from iterflow.evaluation.evaluate import evaluate
from iterflow.train import RunDir, TrainConfig, load_run


def test_split(cfg: TrainConfig, data: str | None = None) -> tuple[torch.Tensor, float | None, Any]:
    """Held-out data of the run (or of another data set ``data``) and its entropy when known."""
    column = cfg.label_column or None if data is None else None
    ds = get_dataset(data or cfg.data, img2d_dir=cfg.img2d_dir, label_column=column)
    splits = ds.splits(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    entropy = ds.entropy() if ds.log_prob(splits.test[:1]) is not None else None
    return splits.test, entropy, ds


def eval_run(
    run: str | Path,
    *,
    data: str | None = None,
    n: int = 2000,
    device: str = "cpu",
    cond_n: int = 500,
    **kwargs: Any,
) -> dict[str, Any]:
    """Evaluate a run folder on its test split (or on ``data``); per-block history included.

    A run trained with class labels adds the conditional figures of
    :func:`iterflow.evaluation.conditional.conditional_metrics` on the first ``cond_n`` labelled
    test rows (``cond_nll``, ``marginal_nll``, ``gen_classifier_accuracy``; each row is
    integrated once per class); its other figures (``nll``, samples) are those of the
    unconditional field (the null label)."""
    flow, cfg, meta = load_run(run, device=device)
    test, entropy, ds = test_split(cfg, data)
    if tuple(test.shape[1:]) != flow.event_shape:
        fail(
            "data",
            f"must have samples of shape {flow.event_shape} like the run's data",
            tuple(test.shape[1:]),
        )
    out = evaluate(flow, test, entropy=entropy, n=n, seed=cfg.seed, **kwargs)
    quantization = getattr(ds, "quantization", None)  # dequantized images: bits/dim of the pixels
    if quantization is not None and math.isfinite(out["nll"]):
        from iterflow.evaluation.bits_per_dim import bits_per_dim

        out["bits_per_dim"] = bits_per_dim(out["nll"], flow.dim, quantization)
    check_positive(cond_n, "cond_n", integer=True, allow_zero=True)
    if flow.num_classes > 0 and cond_n > 0 and ds.num_classes == flow.num_classes:
        out.update(_conditional_figures(flow, ds, cfg, meta, cond_n, kwargs))
    out["data"] = data or cfg.data
    out["method"] = cfg.method
    out["train_seconds"] = meta.get("train_seconds")
    out["per_block"] = [
        {k: v for k, v in r.items() if isinstance(v, (int, float))} for r in meta["history"]
    ]
    if meta.get("rejected") is not None:  # the stage the chain ended before (JKO's val_stop)
        out["rejected_stage"] = {
            k: v for k, v in meta["rejected"].items() if isinstance(v, (int, float))
        }
    return out


def _conditional_figures(
    flow: Any, ds: Any, cfg: TrainConfig, meta: dict[str, Any], n: int, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``conditional_metrics`` on the labelled test rows (prior: the run's class counts)."""
    from iterflow.evaluation.conditional import conditional_metrics

    args = (cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    x, y = ds.splits(*args).test[:n], ds.label_splits(*args).test[:n]
    if x.shape[0] == 0:
        return {}
    x = x.to(device=flow.shift.device, dtype=flow.shift.dtype)
    prior = meta.get("labels", {}).get("class_counts")
    settings = {k: kwargs[k] for k in ("solver", "steps", "atol", "rtol", "divergence", "probes")
                if k in kwargs}  # fmt: skip
    return conditional_metrics(flow, x, y, prior=prior, seed=cfg.seed, **settings)


@torch.no_grad()
def sample_run(
    run: str | Path,
    n: int,
    *,
    seed: int = 0,
    solver: str = "dopri5",
    steps: int = 16,
    device: str = "cpu",
    label: int | str | None = None,
    guidance: float | None = None,
) -> np.ndarray:
    """``n`` samples of a run (data units) as a NumPy array.

    Arguments:
        label: a class of a run trained with labels: its index or one of its ``class_names``
            (``None``: the unconditional field).
        guidance: classifier-free guidance weight (:mod:`iterflow.core.guidance`; needs a run
            with labels; 1: conditional, 0: unconditional).
    """
    flow, _, meta = load_run(run, device=device)
    if guidance is not None and flow.num_classes == 0:
        fail("guidance", "needs a run trained with class labels (train --labels)", guidance)
    y = None if label is None else class_index(label, flow.num_classes, meta)
    gen = torch.Generator(device=flow.shift.device).manual_seed(seed)
    x = flow.sample(n, generator=gen, solver=solver, steps=steps, labels=y, guidance=guidance)
    return x.cpu().numpy()


def class_index(label: int | str, num_classes: int, meta: dict[str, Any]) -> int:
    """The class index of ``label`` (an index in ``[0, K)`` or one of the run's class names).

    Raises:
        InputError: (argument ``label``) an unconditional run, or an unknown class.
    """
    if num_classes == 0:
        fail("label", "needs a run trained with class labels (train --labels)", label)
    names = [str(c) for c in meta.get("labels", {}).get("class_names") or []]
    text = str(label).strip()
    try:
        k = int(text)  # an index first (class names that are numbers: use the index)
    except ValueError:
        if text in names:
            return names.index(text)
        known = f" or one of {names}" if names else ""
        fail("label", f"must be a class index in [0, {num_classes}){known}", label)
    if not 0 <= k < num_classes:
        fail("label", f"must be a class index in [0, {num_classes})", k)
    return k


def plot_run(
    run: str | Path,
    out: str | Path | None = None,
    *,
    n: int = 5000,
    seed: int = 0,
    device: str = "cpu",
) -> list[Path]:
    """Write the standard plots of a run: samples vs data, density, trajectories, per-block figures."""
    from iterflow import viz

    out_dir = Path(out) if out is not None else Path(run) / "plots"
    if out_dir.exists() and not out_dir.is_dir():
        fail("out", "must be a folder for the plots, not a file", str(out_dir))
    flow, cfg, meta = load_run(run, device=device)
    rd = RunDir(run)
    test, _, ds = test_split(cfg)
    data = test[:n]
    gen = torch.Generator(device=flow.shift.device).manual_seed(seed)
    paths: list[Path] = []
    with torch.no_grad():
        samples = flow.sample(len(data), generator=gen, solver="rk4", steps=32).cpu()
    if len(flow.event_shape) == 1 and flow.dim >= 2:
        shown = "" if flow.dim == 2 else " (first two coordinates)"
        lo = torch.quantile(data[:, :2].float(), 0.001, dim=0).min().item()
        hi = torch.quantile(data[:, :2].float(), 0.999, dim=0).max().item()
        pad = 0.1 * (hi - lo)
        bounds = (lo - pad, hi + pad, lo - pad, hi + pad)
        paths.append(
            viz.plot_samples(
                data[:, :2],
                samples[:, :2],
                out_dir / "samples.png",
                title=f"{cfg.method} on {cfg.data}{shown}",
                bounds=bounds,
            )
        )
        if flow.dim == 2:

            def model_lp(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return flow.log_prob(x.to(flow.shift), solver="rk4", steps=32).cpu()

            true_lp = None
            if ds.log_prob(data[:1]) is not None:
                true_lp = ds.log_prob
            paths.append(
                viz.plot_density(
                    model_lp,
                    out_dir / "density.png",
                    bounds=bounds,
                    resolution=120,
                    title="model density",
                    true_log_prob_fn=true_lp,
                )
            )
        with torch.no_grad():
            z = torch.randn((600, *flow.event_shape), generator=gen, device=flow.shift.device)
            traj = flow.trajectory(z, direction="decode", solver="rk4", steps=16).cpu()
        paths.append(
            viz.plot_trajectories(
                traj[..., :2],
                out_dir / "trajectories.png",
                n_show=300,
                title="noise -> data trajectories",
            )
        )
        if flow.num_blocks > 1:
            with torch.no_grad():
                parts = flow.encode_by_block(data[:3000].to(flow.shift), solver="rk4", steps=16)
            paths.append(
                viz.plot_blocks(
                    [p[:, :2].cpu() for p in parts],
                    out_dir / "blocks.png",
                    titles=["data"] + [f"after block {i + 1}" for i in range(flow.num_blocks)],
                )
            )
    series: dict[str, list[float]] = {}
    xs: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    rows = rd.read_log()
    if rows:  # x: optimiser steps counted over all stages (blocks of a progressive chain in turn)
        series["training loss"] = [r["loss"] for r in rows]
        first = stage_first_steps(meta, cfg.steps)
        xs["training loss"] = [first(int(r.get("stage", 0))) + int(r["step"]) for r in rows]
        labels["training loss"] = "optimiser step" + (
            " (all blocks)" if len(meta["history"]) > 1 else ""
        )
    if len(meta["history"]) > 1:
        series["movement per block"] = [r["movement"] for r in meta["history"]]
        for key in ("kl_proxy", "mmd_to_normal", "kl_to_normal"):
            if all(key in r for r in meta["history"]):
                series[f"{key} per block"] = [r[key] for r in meta["history"]]
        labels.update({name: "block" for name in series if name.endswith("per block")})
    if series:
        paths.append(viz.plot_curves(series, out_dir / "training.png", xlabel=labels, x=xs))
    return paths


def stage_first_steps(meta: dict[str, Any], cap: int) -> Callable[[int], int]:
    """``first(k)``: the optimiser steps of the run's stages before stage ``k``, from their records
    in ``meta`` (``history``, and ``rejected``: a stage a time budget ended early took fewer than
    the configured ``cap``); a stage without a record (still training) counts ``cap``.

    Example:
        >>> first = stage_first_steps({"history": [{"stage": 0, "steps": 70}]}, cap=100)
        >>> first(0), first(1), first(2)
        (0, 70, 170)
    """
    records = [*meta.get("history", []), *([meta["rejected"]] if meta.get("rejected") else [])]
    taken = {int(r["stage"]): int(r["steps"]) for r in records if "stage" in r and "steps" in r}
    return lambda k: sum(taken.get(j, cap) for j in range(k))
