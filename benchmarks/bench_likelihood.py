"""Likelihood training at equal wall-clock: JKO-flow vs end-to-end CNF vs flow matching.

For each data set the JKO-flow recipe below is trained from the command line (``iterflow train
--method jko ...``, a subprocess, timed from launch to exit); its wall-clock time ``T`` is then the
budget of the two baselines: end-to-end maximum-likelihood CNF (FFJORD) and flow matching. Each
baseline's step count is set so that its training command also takes about ``T``: a short probe run
measures its seconds per optimiser step and its fixed overhead, and ``steps = (T - overhead) /
seconds_per_step``. Every model is then evaluated by ``iterflow eval`` (``iterflow.report.eval_run``)
with dopri5 at atol = rtol = ``--eval-tol`` (1e-8 by default): the test NLL in nats per sample (exact
trace up to 16 dimensions, Hutchinson above) next to the data's entropy (the floor of any model's
expected NLL, where the density is known), and the inversion error ``max_i |decode(encode(x_i)) -
x_i|`` on 500 test points. The inversion error at eval's default tolerance (1e-5) is shown too, with
the authors' mean-squared version ``E|decode(encode(x)) - x|^2 / 2``: at 1e-5 the adaptive solver's
own error (about 30 times the tolerance per block and round trip, more for the worst points, because
torchdiffeq controls the RMS error over the whole batch) dominates the maximum for any chain of
several non-trivial blocks; at 1e-8 what remains is the flow's own invertibility.

    python benchmarks/bench_likelihood.py [--data rose,checkerboard,sklearn:breast_cancer]
        [--scale 1.0] [--threads N] [--clock wall|cpu] [--methods cnf,fm] [--jko-blocks N]
        [--out benchmarks/results/likelihood.json]

``--scale`` multiplies every JKO step count (0.1 for a quick look; budgets follow). ``--jko-blocks N``
trains N JKO-flow blocks instead of the 2-D recipes' five (rose, checkerboard; the tabular recipe
keeps its own); ``--methods ""`` runs JKO-flow alone. The eight-block rose of the README, i.e.
``iterflow train --method jko --data rose --blocks 8`` then ``iterflow eval --json --atol 1e-8
--rtol 1e-8`` on one thread, is::

    OMP_NUM_THREADS=1 python benchmarks/bench_likelihood.py --data rose --methods "" \
        --jko-blocks 8 --threads 1 --out benchmarks/results/likelihood_rose_jko8.json

``--clock cpu``
budgets the baselines by JKO's CPU seconds instead of its wall-clock seconds: the same thing on a
quiet machine, steadier when others share the CPU (the probe and the run may see different loads).
The rose needs the image folder of the papers' densities (``--img2d-dir``, ``$ITERFLOW_IMG2D_DIR``
or ``../shared/data/img2d``); it is skipped with a message when absent.

The JKO-flow recipe for the rose (the issue's target: test NLL below the authors' 3.12 nats in at most
368 s on a 2-core CPU), as one command::

    iterflow train --method jko --data rose --blocks 5 --steps 400 --batch-size 512 --lr 5e-3 \\
        --hidden 128,128,128 --activation gelu --time-freqs 4 --n-train 20000 \\
        -o gamma=1.0 -o substeps=3 -o jacobian=0.2 --out runs/jko-rose

which is also what the short ``iterflow train --method jko --data rose --out runs/jko-rose`` runs
(these are JKO-flow's recommended settings, used for every flag left out): five blocks, each a
3-layer GELU MLP of width 128 with 4 Fourier time features, trained for 400
Adam steps on 512 particles with a cosine learning rate from 5e-3, EMA 0.999, warm-started from the
previous block; RK4 over 3 sub-steps, exact divergence, a constant JKO step ``gamma = 1`` and a
Jacobian-Frobenius weight of 0.2 that keeps each block's field smooth enough for 3 RK4 sub-steps
(without it the objective learns to exploit the discretisation within a few blocks). The rose's
entropy is about 2.475 nats (the ``entropy`` column of the results).

Measured on the project's 2-core AMD EPYC (Nov 2026) with ``--threads 1 --clock cpu``: each command
on one thread, budgets in CPU seconds (equal wall-clock on an otherwise idle core; it keeps the
comparison fair while other jobs share the machine). The JKO-flow rose command then takes about 185 s
wall (103 s with both cores, the default) for a test NLL of 2.893.

References: Xu, Cheng, Xie, arXiv 2212.14424 (JKO-flow); Grathwohl et al., arXiv 1810.01367 (FFJORD);
Lipman et al., arXiv 2210.02747 (flow matching).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

from iterflow.methods import METHODS  # noqa: E402

# -- recipes ---------------------------------------------------------------------------------------
# CLI arguments per data set; "steps" of JKO is multiplied by --scale, the baselines' steps are set by
# the time budget. Shared arguments first, then each method's own.

# JKO-flow and the CNF run with their recommended settings (``iterflow methods``; what ``iterflow
# train`` uses for every flag left out), so the benchmark and the library cannot drift apart:
# JKO-flow 5 blocks of 400 steps, 3x128 GELU, batch 512, lr 5e-3, gamma 1, 3 RK4 sub-steps, Jacobian
# weight 0.2; the CNF (the best end-to-end CNF tried at this budget: 1 block of width 64 or 128, or 4
# blocks trained jointly) one block of 3x64 GELU, RK4 over 8 steps, the same Jacobian weight.
JKO_RECOMMENDED = METHODS["jko"].recommended
TWO_D = {
    "common": ["--n-train", "20000"],
    "jko": {"blocks": JKO_RECOMMENDED["blocks"], "steps": JKO_RECOMMENDED["steps"], "args": []},
    "cnf": {"blocks": 1, "args": []},
    "fm": {"blocks": 1, "args": ["--hidden", "256,256,256", "--batch-size", "1024", "--lr", "2e-3",
                                 "--activation", "silu", "--time-freqs", "4"]},
}  # fmt: skip

TABULAR = {  # 569 rows of 30 features: train 455, val 57, test 57 (NLL in the data's units)
    "common": ["--batch-size", "256", "--hidden", "64,64", "--activation", "gelu",
               "--time-freqs", "4", "--lr", "1e-3"],
    "jko": {"blocks": 4, "steps": 300,
            "args": ["-o", "gamma=0.5", "-o", "substeps=3", "-o", "jacobian=0.5"]},
    "cnf": {"blocks": 1, "args": ["-o", "steps=8", "-o", "jacobian=0.5"]},
    "fm": {"blocks": 1, "args": ["--hidden", "256,256,256", "--activation", "silu"]},
}  # fmt: skip

RECIPES = {"rose": TWO_D, "checkerboard": TWO_D, "sklearn:breast_cancer": TABULAR}
PROBE_STEPS = 100
PROBE_SECONDS = 5.0


@dataclass
class Timing:
    """Wall-clock and CPU seconds (user + system, all threads) of one command."""

    wall: float
    cpu: float

    def of(self, clock: str) -> float:
        return self.wall if clock == "wall" else self.cpu


def cli(args: list[str], threads: int | None) -> Timing:
    """Run ``iterflow ARGS`` in a fresh interpreter; return its wall-clock and CPU seconds."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "iterflow.cli", *args], env=env, text=True,
                          capture_output=True)  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"iterflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Timing(wall, cpu)


def train_args(
    data: str, method: str, recipe: dict, steps: int, out: Path, extra: list[str]
) -> list[str]:
    spec = recipe[method]
    return ["train", "--method", method, "--data", data, "--blocks", str(spec["blocks"]),
            "--steps", str(steps), *recipe["common"], *spec["args"], *extra,
            "--no-report", "--quiet", "--out", str(out)]  # fmt: skip


def meta(run: Path) -> dict[str, Any]:
    return json.loads((run / "meta.json").read_text())


def calibrate(data: str, method: str, recipe: dict, budget: float, clock: str, extra: list[str],
              threads: int | None) -> int:  # fmt: skip
    """Steps that make ``method``'s training command last about ``budget`` seconds of ``clock``.

    A probe run gives the optimisation's share of the command's time (the trainer's
    ``seconds_optimize`` over the wall-clock time) and its cost per step; the rest is the fixed
    overhead (start-up, data, pushes, per-stage report). A probe whose optimisation took under
    ``PROBE_SECONDS`` (cheap steps, whose first ones are dominated by warm-up) is repeated with
    proportionally more steps.
    """
    steps = PROBE_STEPS
    for _ in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "probe"
            t = cli(train_args(data, method, recipe, steps, run, extra), threads)
            opt = sum(r["seconds_optimize"] for r in meta(run)["history"])
        if opt >= PROBE_SECONDS:
            break
        steps = int(steps * 2 * PROBE_SECONDS / max(opt, 1e-3))
    share = min(1.0, opt / t.wall)
    total = t.of(clock)
    per_step = share * total / steps
    overhead = (1 - share) * total
    return max(PROBE_STEPS, int((budget - overhead) / per_step))


def inversion_at_eval_default(run: Path, n: int = 500) -> dict[str, float]:
    """Inversion errors at ``iterflow eval``'s default tolerance (dopri5, atol = rtol = 1e-5): the
    maximum ``|decode(encode(x)) - x|`` and the authors' mean ``|decode(encode(x)) - x|^2 / 2``."""
    import torch

    from iterflow.apps.report import test_split
    from iterflow.train import load_run

    flow, cfg, _ = load_run(run)
    test, _, _ = test_split(cfg)
    with torch.no_grad():
        x = test[:n].to(flow.shift.dtype)
        err = (flow.decode(flow.encode(x)) - x).flatten(1)
    return {"inv_err_1e-5": float(err.norm(dim=1).max()),
            "inv_mse_1e-5": float(0.5 * err.pow(2).sum(1).mean())}  # fmt: skip


def evaluate_run(run: Path, n_eval: int, tol: float) -> dict[str, Any]:
    """``iterflow eval``'s figures at tolerance ``tol``, plus the inversion errors at 1e-5."""
    from iterflow.apps.report import eval_run

    m = eval_run(run, n=n_eval, atol=tol, rtol=tol)
    hist = meta(run)["history"]
    return {
        "nll": m["nll"],
        "nll_stderr": m["nll_stderr"],
        "entropy": m["entropy"],
        "gap": m["nll_gap"],
        "inv_err": m["inversion_error"],
        **inversion_at_eval_default(run),
        "nfe_nll": m["nfe_nll"],
        "train_seconds": m["train_seconds"],
        "kl_proxy": [r.get("kl_proxy") for r in hist],
    }


def img2d_available(img2d_dir: str | None) -> bool:
    from iterflow.data import get_dataset
    from iterflow.errors import InputError

    try:
        get_dataset("rose", img2d_dir=img2d_dir).sample(1, __import__("torch").Generator())
    except (InputError, OSError):
        return False
    return True


def bench_dataset(data: str, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    """JKO-flow with its recipe, then each baseline with JKO's wall-clock time as its budget."""
    recipe = RECIPES[data]
    if args.jko_blocks is not None and recipe is TWO_D:
        recipe = {**recipe, "jko": {**recipe["jko"], "blocks": args.jko_blocks}}
    extra = ["--seed", str(args.seed)] + (["--img2d-dir", args.img2d_dir] if args.img2d_dir else [])
    rows: list[dict[str, Any]] = []
    budget = 0.0
    for method in ["jko", *[m for m in ("cnf", "fm") if m in args.methods]]:
        if method == "jko":
            steps = max(PROBE_STEPS, int(round(recipe["jko"]["steps"] * args.scale)))
        else:
            steps = calibrate(data, method, recipe, budget, args.clock, extra, args.threads)
        run = root / f"{data.replace(':', '_')}-{method}"
        t = cli(train_args(data, method, recipe, steps, run, extra), args.threads)
        budget = t.of(args.clock) if method == "jko" else budget
        row = {"data": data, "method": method, "blocks": recipe[method]["blocks"], "steps": steps}
        rows.append({**row, "wall_s": t.wall, "cpu_s": t.cpu,
                     **evaluate_run(run, args.eval_n, args.eval_tol)})  # fmt: skip
        print(f"[{data}] {method}: {t.wall:.0f} s wall, {t.cpu:.0f} s CPU, "
              f"NLL {rows[-1]['nll']:.4f}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data", default="rose,checkerboard,sklearn:breast_cancer",
                    help=f"comma-separated, among {sorted(RECIPES)}")  # fmt: skip
    ap.add_argument("--methods", default="cnf,fm", help="baselines to run next to jko")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies the JKO step counts")
    ap.add_argument("--jko-blocks", type=int, default=None,
                    help="JKO-flow blocks of the 2-D recipes (rose, checkerboard; default 5)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="budget the baselines by JKO's wall-clock time, or by its CPU time "
                         "(steadier on a shared machine)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=2000, help="test points for the NLL")
    ap.add_argument("--eval-tol", type=float, default=1e-8, help="dopri5 atol = rtol of the eval")
    ap.add_argument("--img2d-dir", default=None)
    ap.add_argument("--runs-dir", default=None, help="keep the run folders here")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    datasets = [d for d in args.data.split(",") if d]
    unknown = [d for d in datasets if d not in RECIPES]
    if unknown:
        ap.error(f"--data: must be among {sorted(RECIPES)} (got {unknown})")
    if args.scale <= 0:
        ap.error(f"--scale: must be > 0 (got {args.scale})")
    if args.jko_blocks is not None and args.jko_blocks < 1:
        ap.error(f"--jko-blocks: must be >= 1 (got {args.jko_blocks})")
    args.methods = [m for m in args.methods.split(",") if m]
    info = machine()
    info["run_threads"] = args.threads  # OMP_NUM_THREADS of the training commands (None: default)
    info["load_before"] = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for data in datasets:
            if data == "rose" and not img2d_available(args.img2d_dir):
                print(
                    "skipping rose: the img2d folder (img_rose.png) was not found; pass --img2d-dir"
                )
                continue
            rows.extend(bench_dataset(data, args, root))
    info["load_after"] = os.getloadavg()
    print(f"\nmachine: {info}\n")
    cols = ["data", "method", "blocks", "steps", "wall_s", "cpu_s", "nll", "nll_stderr", "entropy",
            "gap", "inv_err", "inv_err_1e-5", "inv_mse_1e-5", "nfe_nll"]  # fmt: skip
    print(table(rows, cols))
    print(f"\nbaselines budgeted by JKO-flow's {args.clock} time")
    write_json(args.out, {"machine": info, "scale": args.scale, "clock": args.clock,
                          "jko_blocks": args.jko_blocks, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
