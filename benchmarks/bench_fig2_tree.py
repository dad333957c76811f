"""The tutorial's Fig. 2 (issue 15, item 3): the fractal tree beside samples of the end-to-end CNF,
flow matching, local flow matching and JKO-flow, each trained for the same wall-clock budget.

Every method runs its recommended settings (``TrainConfig.for_method``, what ``iterflow train
--method M --data tree`` runs), or a preset per method (``--config M=NAME``), with its steps per
stage scaled so that training lasts about ``--budget`` seconds (``bench_anytime.fill_config``: a
probe measures the seconds per step; presets run as written unless ``--fill steps``); training is
capped at the budget in any case, and the model is the one of the last checkpoint
(``bench_anytime.checkpoint_flow``: committed blocks plus the running stage's EMA blocks). Each
panel is a 2-D histogram of ``--n-samples`` samples (dopri5 at ``--sample-tol``), titled with the
method, its test NLL in brackets (exact trace, dopri5 at ``--tol``, float64, ``--n-test`` test
points, ± standard error) and its training time (the trainer's clock, or CPU seconds with
``--clock cpu``; evaluation not counted). The left panel is the data.

Outputs: ``docs/images/fig2_tree.png`` and ``benchmarks/results/fig2_tree.json``.

Usage::

    python benchmarks/bench_fig2_tree.py --budget 600 --threads 2
    OMP_NUM_THREADS=1 python benchmarks/bench_fig2_tree.py --budget 30 --threads 1   # quick look
    # train one method again, the others taken from a former run (its --workdir and its JSON):
    python benchmarks/bench_fig2_tree.py ... --workdir W --reuse fig2_tree.json --rerun jko
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_anytime import (  # noqa: E402
    CLOCK_HELP,
    CLOCKS,
    LABELS,
    ROOT,
    apply_overrides,
    checkpoint_flow,
    dataset_tensors,
    method_config,
    run_method,
)
from common import machine, write_json  # noqa: E402

from iterflow.core.ode import SolverSpec  # noqa: E402

PANEL_ORDER = ("cnf", "fm", "local-fm", "jko")  # the tutorial's order
LIMIT = 4.0  # the img2d densities live on [-4, 4]^2


@torch.no_grad()
def samples(flow: Any, n: int, seed: int, tol: float = 1e-4) -> np.ndarray:
    """``n`` samples of ``flow`` (dopri5 at atol = rtol = ``tol``, float64), ``(n, 2)``."""
    gen = torch.Generator().manual_seed(seed)
    spec = SolverSpec("dopri5", atol=tol, rtol=tol)
    return flow.to(torch.float64).sample(n, generator=gen, solver=spec).cpu().numpy()


def panel_title(label: str, nll: float, se: float, seconds: float) -> str:
    """``CNF [2.531 ± 0.012]`` over ``trained 30 s``: the panel's title.

    Example:
        >>> panel_title("CNF", 2.5312, 0.0121, 29.6)
        'CNF [2.531 ± 0.012]\\ntrained 30 s'
    """
    return f"{label} [{nll:.3f} ± {se:.3f}]\ntrained {seconds:.0f} s"


def figure(panels: list[tuple[str, np.ndarray]], path: Path, bins: int = 200) -> None:
    """One row of 2-D histograms, one per ``(title, points)``, on ``[-4, 4]^2``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.7), layout="constrained")
    for ax, (title, pts) in zip(np.atleast_1d(axes), panels):
        ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=[[-LIMIT, LIMIT], [-LIMIT, LIMIT]],
                  cmap="Greys", cmin=None)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--data", default="tree")
    ap.add_argument("--methods", default=",".join(PANEL_ORDER))
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per method")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[], metavar="METHOD=PRESET")
    ap.add_argument("--fill", choices=("auto", "steps", "none"), default="auto")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--clock", choices=CLOCKS, default="train", help=CLOCK_HELP)
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--n-samples", type=int, default=50_000)
    ap.add_argument("--sample-tol", type=float, default=1e-4, help="dopri5 tolerance of samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img2d-dir", default=os.environ.get("ITERFLOW_IMG2D_DIR"))
    ap.add_argument("--overrides", action="append", default=[], metavar="METHOD:KEY=VALUE")
    ap.add_argument("--out-png", default=str(ROOT / "docs" / "images" / "fig2_tree.png"))
    ap.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" / "fig2_tree.json"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--reuse",
        default=None,
        metavar="JSON",
        help="a former run's results (its run folders in the same --workdir): the "
        "methods it holds are taken from it, not trained, except those in --rerun",
    )
    ap.add_argument(
        "--rerun",
        default="",
        help="comma-separated methods to train again with --reuse (their former run folders in "
        "--workdir are deleted)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = dict(item.split("=", 1) for item in args.config)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_fig2_"))
    former = json.loads(Path(args.reuse).read_text())["methods"] if args.reuse else {}
    rerun = {m for m in args.rerun.split(",") if m}
    panels: list[tuple[str, np.ndarray]] = []
    rows: dict[str, Any] = {}
    data_pts: np.ndarray | None = None
    for method in [m for m in args.methods.split(",") if m]:
        cfg = method_config(method, args.data, presets.get(method), args.img2d_dir, args.seed)
        cfg = apply_overrides(cfg, method, args.overrides)
        train_data, test, entropy = dataset_tensors(cfg, args.n_test)
        if data_pts is None:
            data_pts = train_data.train[: args.n_samples].double().numpy()
            floor = f" (entropy {entropy:.3f})" if entropy is not None else ""
            panels.append((f"data: {args.data}\n{floor.strip(' ()')}", data_pts))
        fill = args.fill == "steps" or (args.fill == "auto" and method not in presets)
        print(f"[{args.data}] {method}: budget {args.budget:g} s", flush=True)
        folder = work / f"{args.data}-{method}"
        if method in former and method not in rerun:  # trained before: its record and folder
            res = former[method]
        else:
            if method in rerun and folder.exists():  # its former run folder is replaced
                shutil.rmtree(folder)
            res = run_method(cfg, train_data, test, folder, args.budget, [args.budget], args.tol,
                             fill, check_tol=False, clock=args.clock)  # fmt: skip
        last = res["checkpoints"][-1]
        flow = checkpoint_flow(folder, res_config(res), tuple(test.shape[1:]))
        pts = samples(flow, args.n_samples, args.seed, args.sample_tol)
        panels.append((panel_title(LABELS[method], last["nll"], last["se"], last["train_s"]), pts))
        for c in res["checkpoints"]:
            c.pop("rows", None)
        rows[method] = res
    figure(panels, Path(args.out_png))
    write_json(args.out_json, {"machine": machine(), "budget": args.budget, "clock": args.clock,
                               "threads": args.threads, "data": args.data, "tol": args.tol,
                               "n_test": args.n_test, "methods": rows})  # fmt: skip
    for m, r in rows.items():
        c = r["checkpoints"][-1]
        print(f"{LABELS[m]:>14}: NLL {c['nll']:.4f} ± {c['se']:.4f} after {c['train_s']:.1f} s")


def res_config(res: dict[str, Any]) -> Any:
    """The (filled) config a :func:`bench_anytime.run_method` result ran with."""
    from iterflow.train import TrainConfig

    return TrainConfig.from_json(res["config"])


if __name__ == "__main__":
    main()
