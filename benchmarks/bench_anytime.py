"""Anytime benchmark: test NLL against training wall-clock for JKO-flow, local flow matching, the
end-to-end CNF and flow matching on the papers' rose and tree (issue 15, item 1).

For each data set and method the run is trained once, up to ``--budget`` seconds, and evaluated at
checkpoints along the way whose training times are roughly log-spaced (``checkpoint_times``: about
four per decade from ``--first`` seconds, plus the marks 2, 10 and 60 minutes and the budget).

How the run is cut into checkpoints. The trainer resumes bit for bit from an in-stage checkpoint
(``progress.safetensors``: weights, EMA, optimiser and generator states). The run is trained in
segments, each a call of :func:`iterflow.train.train_tensors` with ``stop_after_steps`` set to the
steps that reach the next target time (from the seconds per step measured so far) and
``checkpoint_every`` (a runtime key: it does not change the run's config hash) set so that the last
step of the segment is an in-stage checkpoint; the next segment resumes from it. Training time is the
trainer's own clock: the committed stages' ``train_seconds`` (optimisation, pushes and per-stage
reports) plus the running stage's optimisation seconds from ``progress.json``. Evaluation between
segments is not counted. The sum of the segments' wall-clock times (which adds the resumption
overhead of each segment: reading the folder, rebuilding the blocks) and the process CPU time are
recorded next to it, with ``os.getloadavg()`` before and after each method.

What a checkpoint's model is. Every checkpoint's model is the chain of the blocks committed so far
followed by the running stage's blocks with their current EMA weights (the weights the stage would
end with if it stopped there), with the N(0, I) base: for the one-stage methods (flow matching, the
CNF) the EMA model of the run; for the block-wise methods (JKO-flow, local flow matching) a partial
chain. Every block is an invertible ODE map, so a partial chain is still a normalised density
``p(x) = N(T(x)) |det dT/dx|`` on the data space; it is only a worse one while the chain has not yet
carried the data to N(0, I) (local flow matching's early blocks carry it only a short OU time: its
curve starts high by construction). The learning-rate schedule is that of the whole run (cosine over
all its steps), so an early checkpoint is a snapshot of the long run, not a run tuned for that
shorter budget.

Run length. The settings are each method's recommended ones (:meth:`TrainConfig.for_method`, what
``iterflow train --method M`` runs), or a preset / config file per method (``--config M=NAME``,
anything ``iterflow train --config`` accepts; resolved with ``iterflow train --config NAME
--print-config``). With ``--fill auto`` (default) the recommended settings get their steps per block
scaled so that the run lasts about the budget (a probe measures the seconds per optimiser step and
the per-stage overhead); presets run as written (``--fill steps`` / ``none`` force either). The
budget caps the training: no segment starts once the clock passes about 98% of it (a segment
that crosses stages whose pushes take long can overrun it: the JSON records the actual times).

``--clock cpu`` measures the time axis (and the budget) in process CPU seconds of the training
segments instead (resumption overhead included): at one thread on an idle core it is about the
wall-clock time; on a shared machine it is the steadier figure.

Evaluation: exact trace (autograd), dopri5 at atol = rtol = ``--tol`` in float64 on ``--n-test``
test points (5,000 by default: the data set's seeded test split), mean NLL in nats and its standard
error. On the last checkpoint of the methods of ``--tol-check`` (JKO-flow by default) the NLL is
recomputed at ``tol / 100`` on the same points and the difference recorded (``tol_check``; it must
be below 0.005 nats). Local flow matching's recommended blocks are ReLU networks, whose kinks make
dopri5 at tight tolerances very slow: check it only when the time is there.

Outputs: ``benchmarks/results/anytime_<data>.json`` and ``.md`` (a table of the NLL at 2, 10 and
60 minutes, from the latest checkpoint at or before each mark, "—" where the budget was shorter; the
method to pick at each mark, with the paired standard error of its difference to the runner-up), and
``docs/images/anytime_<data>.png`` (the curves on a log time axis, the entropy floor and the published
figures of the img2d README).

Runs in parts. Each (data set, method) run also writes a part, ``results/anytime_parts/
<data><tag>-<method>.json`` with ``_rows.npz`` (the per-row test NLLs at the checkpoints that stand
for the marks and at the last one), and the report is rebuilt from every part of ``<data><tag>``
whose settings (budget, clock, threads, tolerance, test rows, seed) match this run's: so the four
hour-long methods of a data set can run in separate processes, side by side or in separate
sessions, and be reported together
(``--combine-only`` rebuilds the report from the parts without training). ``--tag`` names the report
(``anytime_<data><tag>``), so that a longer run does not replace a shorter one's report.

Usage (the full benchmark, on a quiet machine; about 4 hours per data set)::

    python benchmarks/bench_anytime.py --data rose,tree --budget 3600 --threads 2

Smoke run::

    OMP_NUM_THREADS=1 python benchmarks/bench_anytime.py --data rose --budget 60 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, write_json  # noqa: E402

from iterflow.core.flow import Flow  # noqa: E402
from iterflow.core.ode import SolverSpec  # noqa: E402
from iterflow.data import get_dataset  # noqa: E402
from iterflow.evaluation.evaluate import nll_per_sample  # noqa: E402
from iterflow.io import RunDir, load_json, load_tensors  # noqa: E402
from iterflow.methods import METHODS, parse_options  # noqa: E402
from iterflow.train import TrainConfig, TrainData, load_run, train_tensors  # noqa: E402
from iterflow.train.config import DTYPES  # noqa: E402
from iterflow.train.folder import read_meta  # noqa: E402
from iterflow.train.stages import make_stage_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHOD_ORDER = ("jko", "local-fm", "cnf", "fm")
LABELS = {"jko": "JKO-flow", "local-fm": "local FM", "cnf": "CNF", "fm": "flow matching"}
COLORS = {"jko": "tab:red", "local-fm": "tab:green", "cnf": "tab:blue", "fm": "tab:purple"}
MARKS = (120.0, 600.0, 3600.0)  # 2, 10 and 60 minutes
#: Published figures of the img2d README: (label, NLL, seconds or None for a level line).
PUBLISHED: dict[str, list[tuple[str, float, float | None]]] = {
    "rose": [
        ("JKO-flow paper (GPU, ~80k iterations)", 2.64, None),
        ("JKO-flow official code, 2-core CPU, 2% budget", 3.12, 1104.0),
    ],
    "tree": [("local FM official code, 2-core CPU, 2% budget", 2.644, 1069.0)],
}
TOL_CHECK_LIMIT = 0.005  # nats
#: How far a retrained model's per-row NLL may be from the stored rows (float32) of the part's last
#: checkpoint (:func:`check_part` with ``retrain``): the same model gives float32 rounding only.
REPRODUCE_LIMIT = 1e-4  # nats
CLOCKS = ("train", "cpu")
CLOCK_NAMES = {"train": "the trainer's wall clock", "cpu": "process CPU seconds of the segments"}
CLOCK_HELP = (
    "time axis and budget: the trainer's wall clock (train, default), or the process CPU seconds of "
    "the training segments (cpu: steadier on a shared machine where other jobs, or a tool that "
    "pauses processes, inflate wall-clock times; about equal on an idle core at one thread)"
)
FILL_SAFETY = 0.95  # the filled run aims at this share of the budget (pushes, reports, noise)
STOP_SHARE = 0.98  # a segment aims at this share of its target time; training stops past it


# ------------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_bench_anytime.py)
# ------------------------------------------------------------------------------------------------


def checkpoint_times(
    budget: float,
    first: float = 5.0,
    per_decade: int = 4,
    marks: Sequence[float] = MARKS,
    min_ratio: float = 1.2,
) -> list[float]:
    """Target training times (seconds) of the checkpoints: log-spaced, the marks, the budget.

    The grid is ``first * 10^(i / per_decade)`` below ``budget``; the marks below ``budget`` are
    added, and grid points within a factor ``min_ratio`` of a mark or of the budget are dropped (the
    marks and the budget are kept). Sorted, ascending, ending with ``budget``.

    Example:
        >>> checkpoint_times(60.0, first=5.0, per_decade=2)
        [5.0, 15.811388300841896, 60.0]
    """
    if budget <= 0 or first <= 0 or per_decade < 1:
        raise ValueError("budget, first and per_decade must be > 0")
    keep = sorted({float(m) for m in marks if m < budget} | {float(budget)})
    grid = []
    i = 0
    while (t := first * 10 ** (i / per_decade)) < budget:
        if all(max(t, m) / min(t, m) >= min_ratio for m in keep):
            grid.append(t)
        i += 1
    return sorted(set(grid) | set(keep))


def index_at(times: Sequence[float], mark: float, budget: float) -> int | None:
    """Index of the checkpoint whose value stands for time ``mark``: the latest one trained at or
    before ``mark`` (the model a user would hold then). ``None`` when the budget was shorter than
    ``mark`` or no checkpoint came before it. ``times`` ascending.

    Example:
        >>> index_at([10.0, 100.0, 1000.0], 600.0, 3600.0), index_at([10.0], 600.0, 60.0)
        (1, None)
    """
    if budget < mark:
        return None
    earlier = [i for i, t in enumerate(times) if t <= mark]
    return earlier[-1] if earlier else None


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of the per-row difference ``a - b`` of two methods' NLLs on the same test rows, and
    its standard error ``std(a - b, ddof=1) / sqrt(n)``: what decides which one is better (the
    rows' own spread, shared by both, cancels)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError("a and b must be 1-D of equal length >= 2")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def mean_se(rows: np.ndarray) -> tuple[float, float]:
    """Mean and standard error (ddof 1) of per-row values."""
    r = np.asarray(rows, dtype=np.float64)
    return float(r.mean()), float(r.std(ddof=1) / math.sqrt(r.size))


def fmt_nll(value: float | None, se: float | None) -> str:
    """``2.6412 ± 0.0123``, or "—" when there is no value."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.4f} ± {se:.4f}" if se is not None and math.isfinite(se) else f"{value:.4f}"


def marks_table(
    curves: dict[str, dict[str, Any]], budget: float, marks: Sequence[float] = MARKS
) -> str:
    """Markdown table: one row per method, the NLL (± standard error) at each mark from the
    latest checkpoint at or before it (:func:`index_at`), "—" where there is none.

    ``curves[method]`` holds ``times``, ``nll`` and ``se`` (lists, one entry per checkpoint).
    """
    head = "| method | " + " | ".join(f"NLL at {m / 60:g} min" for m in marks) + " |"
    out = [head, "|---|" + "---|" * len(marks)]
    for method, c in curves.items():
        cells = []
        for m in marks:
            i = index_at(c["times"], m, budget)
            cells.append("—" if i is None else fmt_nll(c["nll"][i], c["se"][i]))
        out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def pick_lines(
    curves: dict[str, dict[str, Any]], budget: float, marks: Sequence[float] = MARKS
) -> list[str]:
    """For each mark: the method with the lowest NLL, and its paired difference to the runner-up
    (``curves[method]["rows"][i]``: per-row NLLs of checkpoint ``i`` on the shared test rows)."""
    lines = []
    for m in marks:
        cands = []
        for method, c in curves.items():
            i = index_at(c["times"], m, budget)
            if i is not None and math.isfinite(c["nll"][i]):
                cands.append((c["nll"][i], method, i))
        if not cands:
            lines.append(f"- {m / 60:g} min: no method has a checkpoint (budget too short)")
            continue
        cands.sort()
        best_v, best, bi = cands[0]
        text = f"- {m / 60:g} min: **{LABELS.get(best, best)}** ({best_v:.4f})"
        if len(cands) > 1:
            _, second, si = cands[1]
            d, se = paired_difference(curves[best]["rows"][bi], curves[second]["rows"][si])
            text += (f"; {LABELS.get(second, second)} is {-d:.4f} ± {se:.4f} nats worse "
                     f"(paired standard error over the test rows)")  # fmt: skip
        lines.append(text)
    return lines


def filled_steps(
    budget: float, rate: float, overhead: float, n_stages: int, safety: float = FILL_SAFETY
) -> int:
    """Steps per stage so that ``n_stages`` stages of ``rate`` seconds per step plus ``overhead``
    seconds per stage (pushes, reports) last ``safety * budget`` seconds (at least 1).

    Example:
        >>> filled_steps(100.0, 0.01, 1.0, 5, safety=1.0)
        1900
    """
    if rate <= 0 or n_stages < 1:
        raise ValueError("rate must be > 0 and n_stages >= 1")
    per_stage = (safety * budget - n_stages * overhead) / n_stages
    return max(1, int(per_stage / rate))


# ------------------------------------------------------------------------------------------------
# Configurations
# ------------------------------------------------------------------------------------------------


def preset_config(preset: str, method: str, data: str | None = None) -> TrainConfig:
    """The :class:`TrainConfig` that ``iterflow train --config PRESET`` would run (a preset name,
    a TOML file or a run folder), resolved by the CLI itself (``--print-config``), so that the
    benchmark reads presets exactly as ``iterflow train`` does. ``data`` (when given) replaces the
    preset's data set. Raises ``ValueError`` when the preset is of another method."""
    cmd = [sys.executable, "-m", "iterflow.cli", "train", "--config", preset, "--print-config"]
    if data is not None:
        cmd += ["--data", data]
    proc = subprocess.run(cmd, text=True, capture_output=True)
    if proc.returncode != 0:
        raise ValueError(f"iterflow train --config {preset} failed:\n{proc.stderr}")
    values = tomllib.loads(proc.stdout)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields})
    if cfg.method != method:
        raise ValueError(f"preset {preset!r} is of method {cfg.method!r}, not {method!r}")
    return cfg


def method_config(
    method: str, data: str, preset: str | None, img2d_dir: str | None, seed: int
) -> TrainConfig:
    """The recommended settings of ``method`` on ``data`` (or the preset's), with the seed."""
    if preset is not None:
        cfg = preset_config(preset, method, data)
        return dataclasses.replace(cfg, img2d_dir=img2d_dir or cfg.img2d_dir)
    return TrainConfig.for_method(method, data=data, img2d_dir=img2d_dir, seed=seed)


def n_stages(cfg: TrainConfig, event_shape: tuple[int, ...]) -> list[list[int]]:
    """The stages (block indices per stage) the trainer runs for ``cfg``."""
    cls = METHODS.get(cfg.method, "method")
    method = cls(parse_options(cls, cfg.options), event_shape=event_shape, num_blocks=cfg.blocks)
    return method.stages()


# ------------------------------------------------------------------------------------------------
# Training in segments
# ------------------------------------------------------------------------------------------------


def run_state(folder: Path, steps: int) -> tuple[float, int]:
    """The run's training seconds so far (the trainer's clock: committed stages plus the running
    stage's optimisation) and its global optimiser steps (``steps`` per stage)."""
    meta = read_meta(RunDir(folder), "out") if (folder / "manifest.json").exists() else None
    seconds = sum(float(r["seconds"]) for r in meta["history"]) if meta else 0.0
    if meta and meta.get("rejected") is not None:  # a stage trained, then dropped (JKO val_stop)
        seconds += float(meta["rejected"]["seconds"])
    done = int(meta["stages_done"]) if meta else 0
    step = 0
    progress = folder / "progress.json"
    if progress.exists():
        pm = load_json(progress, "out")
        if pm.get("stage") == done:
            seconds += float(pm.get("seconds", 0.0))
            step = int(pm["step"])
    return seconds, done * steps + step


def marginal_rate(p: int, t_p: float, t_2p: float) -> float:
    """Seconds per step from runs of ``p`` and ``2 p`` steps lasting ``t_p`` and ``t_2p``: the
    difference ``(t_2p - t_p) / p`` cancels costs paid once per run; ``t_2p / (2 p)`` when the
    difference is not positive (timer noise on tiny runs).

    Example:
        >>> marginal_rate(100, 1.5, 2.5), marginal_rate(100, 2.0, 1.9)
        (0.01, 0.0095)
    """
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    return (t_2p - t_p) / p if t_2p > t_p else t_2p / (2 * p)


def probe(cfg: TrainConfig, data: TrainData, min_seconds: float = 2.0) -> dict[str, float]:
    """Seconds per optimiser step and per-stage overhead of ``cfg``, from its first stage run
    with few steps in a temporary folder.

    The step count doubles until a run takes ``min_seconds``; then a run twice as long gives the
    marginal rate ``(t(2p) - t(p)) / p``, free of the fixed costs inside the optimisation time
    (the first steps' warm-up, the closing checkpoint). ``t(p) / p`` alone overestimated the rate
    by ~12 % for flow matching on the rose, so hour-long filled runs ended at 80-97 % of their
    budget (:func:`marginal_rate`).
    """

    def one(steps: int) -> tuple[dict[str, Any], float]:
        with tempfile.TemporaryDirectory() as tmp:
            small = dataclasses.replace(cfg, steps=steps, checkpoint_every=steps)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                train_tensors(small, data, Path(tmp) / "probe", stop_after_steps=steps)
            except KeyboardInterrupt as e:
                if "stop_after_steps" not in str(e):
                    raise
            cpu_share = (time.process_time() - c0) / max(time.perf_counter() - t0, 1e-9)
            rec = read_meta(RunDir(Path(tmp) / "probe"), "out")["history"][0]  # type: ignore[index]
        return rec, cpu_share

    p = 20
    for _ in range(6):
        rec, cpu_share = one(p)
        opt = float(rec["seconds_optimize"])
        if opt >= min_seconds:
            break
        p = int(p * 2 * min_seconds / max(opt, 1e-3))
    rec2, cpu_share = one(2 * p)
    opt2 = float(rec2["seconds_optimize"])
    return {"probe_steps": p, "rate": marginal_rate(p, opt, opt2), "rate_naive": opt2 / (2 * p),
            "overhead": float(rec2["seconds"]) - opt2, "cpu_share": cpu_share}  # fmt: skip


def fill_config(
    cfg: TrainConfig, data: TrainData, budget: float, clock: str = "train"
) -> tuple[TrainConfig, dict]:
    """``cfg`` with its steps per stage scaled so that the run lasts about ``budget`` seconds of
    ``clock`` (``train``: the trainer's wall clock; ``cpu``: process CPU seconds)."""
    t0 = time.perf_counter()
    info = probe(cfg, data, min(2.0, budget / 20))
    if clock == "cpu":
        info["rate"] *= info["cpu_share"]
        info["overhead"] *= info["cpu_share"]
    stages = len(n_stages(cfg, tuple(data.train.shape[1:])))
    steps = filled_steps(budget, info["rate"], info["overhead"], stages)
    info.update(stages=stages, steps=steps, steps_recommended=cfg.steps,
                overhead_share=stages * info["overhead"] / budget,
                probe_wall_s=time.perf_counter() - t0)  # fmt: skip
    if info["overhead_share"] > 0.5:
        print(
            f"  warning: {cfg.method}'s per-stage overhead (pushes, reports) takes "
            f"{info['overhead_share']:.0%} of the budget; steps per stage: {steps}",
            flush=True,
        )
    return dataclasses.replace(cfg, steps=steps), info


def train_segments(
    cfg: TrainConfig,
    data: TrainData,
    folder: Path,
    times: Sequence[float],
    rate: float,
    on_checkpoint: Callable[[Path, dict[str, Any]], dict[str, Any]],
    clock_kind: str = "train",
) -> list[dict[str, Any]]:
    """Train ``cfg`` into ``folder`` in segments ending near the training times ``times``
    (seconds, ascending; the last is the budget), calling ``on_checkpoint(folder, timing)`` after
    each (not timed). ``rate`` is the first guess of seconds per step. ``clock_kind``: ``train``
    (the trainer's wall clock) or ``cpu`` (the segments' process CPU seconds) is the time axis.
    Returns the records."""
    stages = n_stages(cfg, tuple(data.train.shape[1:]))
    total = len(stages) * cfg.steps
    clock, g, wall, cpu = 0.0, 0, 0.0, 0.0
    records: list[dict[str, Any]] = []
    finished = False
    for target in times:
        if finished or clock >= STOP_SHARE * times[-1]:
            break
        if clock >= STOP_SHARE * target:
            continue
        n = min(max(1, round((STOP_SHARE * target - clock) / rate)), total - g)
        t0, c0 = time.perf_counter(), time.process_time()
        finished = train_segment(cfg, data, folder, g + n, n)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        new_clock, new_g = run_state(folder, cfg.steps)
        trainer_s = new_clock
        if clock_kind == "cpu":
            new_clock = cpu
        if finished:
            new_g = total
        if new_g > g:
            rate = max((new_clock - clock) / (new_g - g), 1e-6)
        clock, g = new_clock, new_g
        timing = {"train_s": clock, "trainer_s": trainer_s, "wall_s": wall, "cpu_s": cpu,
                  "clock": clock_kind, "global_step": g,
                  "total_steps": total, "finished": finished}  # fmt: skip
        records.append({**timing, **on_checkpoint(folder, timing)})
        print(f"  [{cfg.method}] {clock:7.1f} s train, step {g}/{total}: "
              f"NLL {records[-1].get('nll', float('nan')):.4f}", flush=True)  # fmt: skip
    return records


def train_segment(cfg: TrainConfig, data: TrainData, folder: Path, end: int, n: int | None) -> bool:
    """Train ``cfg`` in ``folder`` (resuming from its checkpoint) for ``n`` more optimiser steps
    (``None``: to the end), so that global step ``end`` is an in-stage checkpoint
    (``checkpoint_every``, a runtime key, set from it). Returns whether the run finished."""
    _, s = divmod(end, cfg.steps)
    seg = dataclasses.replace(cfg, checkpoint_every=s if s > 0 else cfg.steps)
    try:
        train_tensors(seg, data, folder, stop_after_steps=n)
    except KeyboardInterrupt as e:
        if "stop_after_steps" not in str(e):
            raise
        return False
    return True


def checkpoint_flow(folder: Path, cfg: TrainConfig, event_shape: tuple[int, ...]) -> Flow:
    """The model of the run's latest checkpoint: the committed blocks, then the running stage's
    blocks with the EMA weights of its in-stage checkpoint (when it has one), with the run's
    normalisation (see the module docstring)."""
    run = RunDir(folder)
    meta = read_meta(run, "out") if run.manifest.exists() else None
    blocks = list(load_run(folder)[0].chain) if meta and meta["networks"] else []
    done = int(meta["stages_done"]) if meta else 0
    progress = folder / "progress.json"
    if progress.exists() and load_json(progress, "out").get("stage") == done:
        dtype = DTYPES[cfg.dtype]
        indices = n_stages(cfg, event_shape)[done]
        new = make_stage_blocks(cfg, indices, blocks, done, event_shape, torch.device("cpu"), dtype)
        stage = Flow(new, event_shape)
        params = [p for _, p in stage.named_parameters() if p.requires_grad]
        saved = load_tensors(folder / "progress.safetensors", "out")
        key = "ema" if cfg.ema > 0 else "param"
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(saved[f"{key}.{i}"].to(p.dtype))
        blocks = [b.to(dtype) for b in blocks] + new
    norm = load_tensors(run.normalization, "out")
    return Flow(blocks, event_shape, shift=norm["shift"], scale=norm["scale"]).eval()


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def nll_rows(flow: Flow, test: torch.Tensor, tol: float, seed: int = 0) -> tuple[np.ndarray, int]:
    """Per-row test NLL (nats): exact trace, dopri5 at atol = rtol = ``tol``, float64."""
    f = flow.to(torch.float64)
    rows, nfe = nll_per_sample(f, test.to(torch.float64), spec=SolverSpec("dopri5", atol=tol,
                               rtol=tol), divergence="exact", seed=seed)  # fmt: skip
    return rows.cpu().numpy(), int(nfe)


def evaluator(
    cfg: TrainConfig, test: torch.Tensor, tol: float
) -> Callable[[Path, dict[str, Any]], dict[str, Any]]:
    """``on_checkpoint`` of :func:`train_segments`: the checkpoint model's test NLL."""
    shape = tuple(test.shape[1:])

    def on_checkpoint(folder: Path, timing: dict[str, Any]) -> dict[str, Any]:
        flow = checkpoint_flow(folder, cfg, shape)
        t0 = time.perf_counter()
        rows, nfe = nll_rows(flow, test, tol, cfg.seed)
        value, se = mean_se(rows)
        return {"nll": value, "se": se, "nfe": nfe, "blocks_in_model": flow.num_blocks,
                "eval_s": time.perf_counter() - t0, "rows": rows}  # fmt: skip

    return on_checkpoint


def tol_check(flow: Flow, test: torch.Tensor, tol: float, seed: int) -> dict[str, float]:
    """NLL at ``tol`` and at ``tol / 100`` on the same rows: their difference bounds the solver's
    error of the reported figures."""
    a, nfe_a = nll_rows(flow, test, tol, seed)
    b, nfe_b = nll_rows(flow, test, tol / 100, seed)
    diff = abs(float(a.mean() - b.mean()))
    return {"tol": tol, "tight_tol": tol / 100, "nll": float(a.mean()),
            "nll_tight": float(b.mean()), "abs_diff": diff,
            "max_row_diff": float(np.abs(a - b).max()), "nfe": nfe_a, "nfe_tight": nfe_b,
            "below_limit": diff < TOL_CHECK_LIMIT}  # fmt: skip


# ------------------------------------------------------------------------------------------------
# One method, one data set
# ------------------------------------------------------------------------------------------------


def run_method(
    cfg: TrainConfig,
    data: TrainData,
    test: torch.Tensor,
    folder: Path,
    budget: float,
    times: Sequence[float],
    tol: float,
    fill: bool,
    check_tol: bool = True,
    clock: str = "train",
) -> dict[str, Any]:
    """Train ``cfg`` up to ``budget`` seconds with checkpoints near ``times``; evaluate each."""
    load_before = os.getloadavg()
    fill_info: dict[str, Any] = {}
    if fill:
        cfg, fill_info = fill_config(cfg, data, budget, clock)
        rate = fill_info["rate"]
    else:
        info = probe(cfg, data, min(2.0, budget / 20))
        rate = info["rate"] * (info["cpu_share"] if clock == "cpu" else 1.0)
    records = train_segments(cfg, data, folder, times, rate, evaluator(cfg, test, tol), clock)
    out: dict[str, Any] = {
        "method": cfg.method,
        "config": cfg.to_json(),
        "fill": fill_info or None,
        "stages": len(n_stages(cfg, tuple(test.shape[1:]))),
        "checkpoints": records,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "threads": torch.get_num_threads(),
    }
    if check_tol and records:
        flow = checkpoint_flow(folder, cfg, tuple(test.shape[1:]))
        out["tol_check"] = tol_check(flow, test, tol, cfg.seed)
    return out


def dataset_tensors(cfg: TrainConfig, n_test: int) -> tuple[TrainData, torch.Tensor, float | None]:
    """The training data of ``cfg``'s named data set, ``n_test`` test rows and its entropy."""
    ds = get_dataset(cfg.data, img2d_dir=cfg.img2d_dir)
    splits = ds.splits(cfg.n_train, cfg.n_val, n_test, cfg.seed)
    data = TrainData(splits.train, splits.val, ds.describe(), test=splits.test)
    entropy = ds.entropy() if ds.log_prob(splits.test[:1]) is not None else None
    return data, splits.test, entropy


def curves_of(
    methods: dict[str, dict[str, Any]], rows: dict[str, list[np.ndarray]]
) -> dict[str, dict[str, Any]]:
    """Per method: ``times``, ``nll``, ``se`` and (from ``rows``) the per-row NLLs over its
    checkpoints."""
    return {
        m: {
            "times": [c["train_s"] for c in r["checkpoints"]],
            "nll": [c["nll"] for c in r["checkpoints"]],
            "se": [c["se"] for c in r["checkpoints"]],
            "rows": rows[m],
        }
        for m, r in methods.items()
    }


def plot(
    curves: dict[str, dict[str, Any]],
    data: str,
    entropy: float | None,
    path: Path,
    budget: float,
    title: str = "",
    xlabel: str = CLOCK_NAMES["train"],
) -> None:
    """NLL against training time (log axis): the methods, the entropy floor, the published
    figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m, c in curves.items():
        ax.errorbar(c["times"], c["nll"], yerr=c["se"], marker="o", ms=3, capsize=2,
                    color=COLORS.get(m), label=LABELS.get(m, m))  # fmt: skip
    if entropy is not None:
        ax.axhline(entropy, color="k", ls="--", lw=1, label=f"entropy floor {entropy:.3f}")
    for label, value, seconds in PUBLISHED.get(data, []):
        if seconds is None:
            ax.axhline(value, color="tab:orange", ls=":", lw=1.2, label=f"{label}: {value}")
        else:
            ax.plot([seconds], [value], marker="*", ms=11, color="tab:orange", ls="none",
                    label=f"{label}: {value} at {seconds:.0f} s")  # fmt: skip
    for m in MARKS:
        if m <= budget:
            ax.axvline(m, color="0.85", lw=0.8, zorder=0)
    ax.set_xscale("log")
    finite = [v for c in curves.values() for v in c["nll"] if math.isfinite(v)]
    if finite and entropy is not None:
        hi = min(max(finite), entropy + 3.0)
        ax.set_ylim(entropy - 0.1, max(hi, 3.2) + 0.05)
    ax.set_xlabel(f"training time: {xlabel} (s, log scale; evaluation not counted)")
    ax.set_ylabel("test NLL (nats)")
    ax.set_title(title or f"{data}: test NLL against training time")
    ax.legend(fontsize=7.5, loc="upper right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def trained_on(methods: dict[str, Any]) -> str:
    """The hosts the parts were trained on: one name when they share it, else one per method."""
    hosts = {m: r.get("machine", {}).get("cpu", "not recorded") for m, r in methods.items()}
    if len(set(hosts.values())) == 1:
        return f"Trained on: {next(iter(hosts.values()))} (every method)."
    return "Trained on: " + "; ".join(f"{LABELS.get(m, m)}: {h}" for m, h in hosts.items()) + "."


def markdown(data: str, result: dict[str, Any], curves: dict[str, dict[str, Any]]) -> str:
    """The ``anytime_<data>.md`` report."""
    budget = result["budget"]
    floor = f"; entropy floor {result['entropy']:.3f}" if result["entropy"] is not None else ""
    lines = [f"# Anytime benchmark: {data}", "",
             f"Budget {budget:g} s per method, {result['threads']} thread(s); machine: "
             f"{result['machine']['cpu']} ({result['machine']['cores']} cores). Test NLL in nats "
             f"(exact trace, dopri5 at {result['tol']:g}, float64) on {result['n_test']} test "
             f"points, ± standard error{floor}.", "",
             trained_on(result["methods"]), "",
             marks_table(curves, budget), "",
             "Method to pick at each budget (lowest NLL at the mark):", "",
             *pick_lines(curves, budget), "",
             "| method | steps/stage x stages | checkpoints | last train s | wall s | CPU s | "
             "last NLL | tol check (|Δ| at tol/100) | load before → after |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, r in result["methods"].items():
        last = r["checkpoints"][-1] if r["checkpoints"] else {}
        tc = r.get("tol_check") or {}
        stages = r.get("stages") or (r.get("fill") or {}).get("stages", "")
        rows_note = f" ({tc['rows']} rows)" if "rows" in tc else ""
        if tc.get("retrained"):
            rows_note = (f" ({tc['rows']} rows; model trained again, its rows within "
                         f"{tc['reproduced_max_diff']:.0e} of the reported)")  # fmt: skip
        lines.append(
            f"| {LABELS.get(m, m)} | {r['config']['steps']} x {stages} | {len(r['checkpoints'])}"
            f" | {last.get('train_s', float('nan')):.1f} | {last.get('wall_s', float('nan')):.1f}"
            f" | {last.get('cpu_s', float('nan')):.1f} | "
            f"{fmt_nll(last.get('nll'), last.get('se'))} | {tc.get('abs_diff', float('nan')):.2e}"
            f"{rows_note}"
            f" | {r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |"
        )
    lines += ["", "Model at a checkpoint: the committed blocks plus the running stage's EMA "
              "blocks (a partial chain for JKO-flow and local FM, still a normalised density). "
              f"Times: {CLOCK_NAMES[result.get('clock', 'train')]} (training only).", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data", default="rose,tree", help="comma-separated: rose, tree")
    ap.add_argument("--methods", default=",".join(METHOD_ORDER))
    ap.add_argument("--budget", type=float, default=3600.0, help="training seconds per method")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and eval)")
    ap.add_argument("--first", type=float, default=5.0, help="first checkpoint time (s)")
    ap.add_argument("--per-decade", type=int, default=4, help="checkpoints per decade of time")
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=PRESET",
                    help="preset name / TOML file / run folder for a method (repeatable)")  # fmt: skip
    ap.add_argument("--fill", choices=("auto", "steps", "none"), default="auto",
                    help="scale steps per stage to fill the budget (auto: unless a preset is "
                         "given)")  # fmt: skip
    ap.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol of the NLL")
    ap.add_argument("--clock", choices=CLOCKS, default="train", help=CLOCK_HELP)
    ap.add_argument(
        "--tol-check",
        default="jko",
        help="methods whose last checkpoint is evaluated at tol / 100 too ('all')",
    )
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img2d-dir", default=os.environ.get("ITERFLOW_IMG2D_DIR"))
    ap.add_argument(
        "--overrides",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override a TrainConfig field of one method (tests, quick looks)",
    )
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--img", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--workdir", default=None, help="keep the run folders here")
    ap.add_argument("--tag", default="", help="report name suffix: anytime_<data><tag>")
    ap.add_argument("--tol-check-only", type=int, default=None, metavar="ROWS",
                    help="train nothing: check the solver error of each part's last checkpoint "
                         "(the run folder in --workdir) at tol / 100 on the first ROWS test rows, "
                         "store it in the part and rebuild the report")  # fmt: skip
    ap.add_argument("--retrain", action="store_true",
                    help="with --tol-check-only: train each part's run again into an empty run "
                         "folder first (no evaluations) and check that it reproduces the part's "
                         "stored rows; run at the part's thread count")  # fmt: skip
    ap.add_argument("--combine-only", action="store_true",
                    help="rebuild the reports from the matching parts; train nothing")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = dict(item.split("=", 1) for item in args.config)
    methods = [m for m in args.methods.split(",") if m]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_anytime_"))
    times = checkpoint_times(args.budget, args.first, args.per_decade)
    parts = Path(args.results) / "anytime_parts"
    for data in [d for d in args.data.split(",") if d]:
        settings = {"data": data, "budget": args.budget, "clock": args.clock,
                    "threads": args.threads, "tol": args.tol, "n_test": args.n_test,
                    "seed": args.seed}  # fmt: skip
        extra = {"machine": machine(), "published": PUBLISHED.get(data, [])}
        if args.tol_check_only is not None:
            for method in methods:
                check_part(parts, f"{data}{args.tag}-{method}", work / f"{data}-{method}",
                           args.tol_check_only, args.img2d_dir, args.retrain)  # fmt: skip
        if args.combine_only or args.tol_check_only is not None:
            cfg = method_config(methods[0], data, None, args.img2d_dir, args.seed)
            extra["entropy"] = dataset_tensors(cfg, args.n_test)[2]
            combine(parts, settings, args.tag, extra, Path(args.results), Path(args.img))
            continue
        for method in methods:
            cfg = method_config(method, data, presets.get(method), args.img2d_dir, args.seed)
            cfg = apply_overrides(cfg, method, args.overrides)
            train_data, test, entropy = dataset_tensors(cfg, args.n_test)
            fill = args.fill == "steps" or (args.fill == "auto" and method not in presets)
            print(f"[{data}] {method}: budget {args.budget:g} s", flush=True)
            folder = work / f"{data}-{method}"
            check = args.tol_check == "all" or method in args.tol_check.split(",")
            run = run_method(cfg, train_data, test, folder, args.budget, times, args.tol, fill,
                             check, args.clock)  # fmt: skip
            rows = [c.pop("rows") for c in run["checkpoints"]]
            run["times"] = times
            run["machine"] = extra["machine"]  # parts of one report may come from other hosts
            # written after every method (a crash keeps the others), then the report from all
            # the matching parts, this session's and earlier ones'
            save_part(parts, f"{data}{args.tag}-{method}", settings, run, rows, args.budget)
            extra["entropy"] = entropy
            combine(parts, settings, args.tag, extra, Path(args.results), Path(args.img))


def apply_overrides(cfg: TrainConfig, method: str, overrides: Sequence[str]) -> TrainConfig:
    """``METHOD:KEY=VALUE`` overrides of TrainConfig fields (values coerced by the config);
    ``METHOD:options.NAME=VALUE`` sets one of the method's options, keeping the others."""
    given: dict[str, Any] = {}
    options = dict(cfg.options)
    for item in overrides:
        target, _, kv = item.partition(":")
        if target != method:
            continue
        key, _, value = kv.partition("=")
        if key.startswith("options."):
            options[key.removeprefix("options.")] = parse_value(key, value)
            given["options"] = options
        else:
            given[key] = parse_value(key, value)
    return dataclasses.replace(cfg, **given) if given else cfg


def parse_value(key: str, text: str) -> Any:
    """A command-line value: ``hidden`` as integers, else int, float or the text itself."""
    if key == "hidden":
        return tuple(int(v) for v in text.split(","))
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def write_results(
    data: str,
    result: dict[str, Any],
    curves: dict[str, dict[str, Any]],
    res: Path,
    img: Path,
    tag: str = "",
) -> None:
    """Write ``anytime_<data><tag>.json`` / ``.md`` under ``res`` and the PNG under ``img``."""
    plot(curves, data, result["entropy"], img / f"anytime_{data}{tag}.png", result["budget"],
         f"{data}: test NLL against training time ({result['threads']} thread(s))",
         CLOCK_NAMES[result.get("clock", "train")])  # fmt: skip
    md = markdown(data, result, curves)
    result["marks_table"] = marks_table(curves, result["budget"])
    write_json(str(res / f"anytime_{data}{tag}.json"), result)
    (res / f"anytime_{data}{tag}.md").write_text(md)
    print(md)


# ------------------------------------------------------------------------------------------------
# Parts: one (data set, method) run each, combined into one report
# ------------------------------------------------------------------------------------------------

#: Settings that must agree for parts to share a report.
PART_KEYS = ("data", "budget", "clock", "threads", "tol", "n_test", "seed")


def save_part(
    parts: Path,
    name: str,
    settings: dict[str, Any],
    run: dict[str, Any],
    rows: list[np.ndarray],
    budget: float,
) -> None:
    """Write part ``name`` (``<data><tag>-<method>``): ``settings`` and the method's ``run``
    record as JSON, and the per-row NLLs of the checkpoints that stand for the marks
    (:func:`index_at`; what :func:`pick_lines` needs) and of the last one as ``_rows.npz``
    (float32)."""
    times = [c["train_s"] for c in run["checkpoints"]]
    keep = sorted({i for m in MARKS if (i := index_at(times, m, budget)) is not None}
                  | ({len(times) - 1} if times else set()))  # fmt: skip
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / f".{name}_rows.tmp.npz"
    np.savez_compressed(tmp, index=np.asarray(keep, dtype=np.int64),
                        rows=np.stack([rows[i] for i in keep]).astype(np.float32)
                        if keep else np.zeros((0, 0), np.float32))  # fmt: skip
    os.replace(tmp, parts / f"{name}_rows.npz")
    part = {**settings, "written": time.strftime("%Y-%m-%d %H:%M:%S"), "run": run}
    write_json(str(parts / f"{name}.json"), part)


def retrain_part(part: dict[str, Any], cfg: TrainConfig, data: TrainData, folder: Path) -> int:
    """Train part ``part``'s run again into ``folder`` (empty or absent), without evaluations, up
    to the global step of its last checkpoint, ending on an in-stage checkpoint there as
    :func:`train_segments` did (the trainer resumes bit for bit, so one segment gives the model
    of many, at the part's thread count). Returns that step."""
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--retrain: the run folder {folder} is not empty")
    last = part["run"]["checkpoints"][-1]
    g = int(last["global_step"])
    train_segment(cfg, data, folder, g, None if last["finished"] else g)
    done = run_state(folder, cfg.steps)[1]
    if not last["finished"] and done != g:
        raise RuntimeError(f"--retrain: the run stopped at step {done}, the part's at {g}")
    return g


def check_part(
    parts: Path,
    name: str,
    folder: Path,
    n_rows: int,
    img2d_dir: str | None = None,
    retrain: bool = False,
) -> dict[str, Any]:
    """:func:`tol_check` of part ``name``'s last checkpoint, after the fact: the model is rebuilt
    from its run folder ``folder`` (as :func:`checkpoint_flow` does during the run) and evaluated
    at the part's ``tol`` and ``tol / 100`` on the first ``n_rows`` of the same test rows (a check
    of the solver's error, so a subset suffices; the stiff local-FM chains cost minutes per
    thousand rows). With ``retrain`` the run folder is made first by :func:`retrain_part` (for
    parts whose folders are gone), and the rebuilt model's NLL at ``tol`` on all the part's test
    rows (one batch, as during the run) is compared with the part's stored rows of its last
    checkpoint (``reproduced_max_diff``, which must be below :data:`REPRODUCE_LIMIT`: it shows
    that the model checked is the model reported). Stored as the part's ``tol_check`` (with
    ``rows``), the JSON rewritten atomically (``write_json``); returned."""
    path = parts / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"--tol-check-only: no part {path}")
    if n_rows < 2:
        raise ValueError(f"--tol-check-only: ROWS must be >= 2, got {n_rows}")
    part = load_json(path, "part")
    cfg = TrainConfig.from_json(part["run"]["config"])
    if img2d_dir is not None:
        cfg = dataclasses.replace(cfg, img2d_dir=img2d_dir)
    data, test, _ = dataset_tensors(cfg, int(part["n_test"]))
    extra: dict[str, Any] = {}
    if retrain:
        last = len(part["run"]["checkpoints"]) - 1
        index, stored = part_rows(parts, name)
        if last not in index:
            raise ValueError(f"--retrain: part {name} stores no rows of its last checkpoint")
        t0 = time.perf_counter()
        step = retrain_part(part, cfg, data, folder)
        extra = {"retrained": True, "retrain_s": time.perf_counter() - t0, "retrain_step": step}
    flow = checkpoint_flow(folder, cfg, tuple(test.shape[1:]))
    if retrain:  # all the test rows in one batch, as during the run (adaptive steps depend on it)
        rows = nll_rows(flow, test, float(part["tol"]), cfg.seed)[0]
        extra["reproduced_max_diff"] = float(np.abs(rows - stored[index.index(last)]).max())
        if extra["reproduced_max_diff"] > REPRODUCE_LIMIT:
            raise RuntimeError(
                f"--retrain: the retrained model of {name} differs from the reported one: max "
                f"row difference {extra['reproduced_max_diff']:.3g} nats > {REPRODUCE_LIMIT}"
            )
    test = test[:n_rows]
    check = {**tol_check(flow, test, float(part["tol"]), cfg.seed), "rows": int(test.shape[0]),
             **extra}  # fmt: skip
    part["run"]["tol_check"] = check
    write_json(str(path), part)
    return check


def part_rows(parts: Path, name: str) -> tuple[list[int], np.ndarray]:
    """Part ``name``'s stored rows: the checkpoint indices and their per-row NLLs (float64)."""
    with np.load(parts / f"{name}_rows.npz", allow_pickle=False) as z:
        return z["index"].tolist(), z["rows"].astype(np.float64)


def load_parts(
    parts: Path, data: str, tag: str, settings: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[np.ndarray | None]], list[str]]:
    """The parts of ``<data><tag>`` whose :data:`PART_KEYS` equal ``settings``': their run
    records and per-checkpoint rows (``None`` where not stored), in :data:`METHOD_ORDER`; and
    one line per part left out (with the setting that differs)."""
    runs: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[np.ndarray | None]] = {}
    skipped: list[str] = []
    for method in METHOD_ORDER:
        path = parts / f"{data}{tag}-{method}.json"
        if not path.is_file():
            continue
        part = load_json(path, "part")
        bad = [k for k in PART_KEYS if part.get(k) != settings.get(k)]
        if bad:
            skipped.append(f"{path.name}: " + ", ".join(
                f"{k} {part.get(k)!r} (this run {settings.get(k)!r})" for k in bad))  # fmt: skip
            continue
        index, stored = part_rows(parts, f"{data}{tag}-{method}")
        per: list[np.ndarray | None] = [None] * len(part["run"]["checkpoints"])
        for k, i in enumerate(index):
            per[i] = stored[k]
        runs[method], rows[method] = part["run"], per
    return runs, rows, skipped


def combine(
    parts: Path, settings: dict[str, Any], tag: str, extra: dict[str, Any], res: Path, img: Path
) -> None:
    """Rebuild the report of ``settings['data']`` and ``tag`` from the matching parts."""
    data = settings["data"]
    runs, rows, skipped = load_parts(parts, data, tag, settings)
    for line in skipped:
        print(f"  part left out (other settings): {line}", flush=True)
    if not runs:
        print(f"[{data}] no part of anytime_{data}{tag} matches these settings", flush=True)
        return
    result = {**settings, **extra, "methods": runs, "parts": sorted(runs)}
    write_results(data, result, curves_of(runs, rows), res, img, tag)


if __name__ == "__main__":
    main()
