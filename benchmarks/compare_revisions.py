"""Training speed of two git revisions of iterflow, side by side in one run (interleaved rounds).

Figures taken on different days are not comparable on a shared machine (the same 2-core CPU has
been measured at 71.7 and 96.4 GFLOP/s fp32, 277 and 209 GFLOP/s bf16 on different days), so a
change's effect on speed is measured here: each revision is checked out into a temporary git
worktree, and the same training configurations run alternately under each, one process at a time,
``--rounds`` times; the table gives the median steps/s per revision, their ratio, and the median
(with the range) of the rounds' own ratios: a round runs the two revisions back to back, so its
ratio cancels the machine's drift between rounds (not the noise within one).

Usage (from the repository root; the machine otherwise idle)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare_revisions.py --old 80aa0c1 --new HEAD \\
        --out benchmarks/results/revisions.json

Each run calls ``iterflow.train.train`` of that revision (``PYTHONPATH`` set to its worktree) and
reports ``seconds_optimize`` of the first stage, i.e. the optimisation loop alone (data preparation,
pushes and evaluation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> TrainConfig fields (keyword arguments understood by every revision since 0.1)
CASES: dict[str, dict[str, object]] = {
    "demo recipe (fm, checkerboard, 3x256, batch 1024)": dict(
        method="fm", data="checkerboard", steps=600, n_val=500, n_test=500
    ),
    "the same in fp32 (autocast none)": dict(
        method="fm", data="checkerboard", steps=600, n_val=500, n_test=500, autocast="none"
    ),
    "minibatch OT (the demo recipe with the OT coupling)": dict(
        method="fm",
        data="checkerboard",
        steps=600,
        n_val=500,
        n_test=500,
        options={"coupling": "ot"},
    ),  # fmt: skip
    "make demo's network (the same with 64 Fourier features of x)": dict(
        method="fm", data="checkerboard", steps=600, n_val=500, n_test=500, x_freqs=64, x_scale=1.0
    ),
    "global fm of the local-FM benchmark (tree, 3x319 relu, batch 4096)": dict(
        method="fm",
        data="tree",
        steps=300,
        batch_size=4096,
        lr=2e-3,
        hidden=[319, 319, 319],
        activation="relu",
        n_train=100000,
        n_val=500,
        n_test=500,
    ),
    "jko-flow block (rose, recommended settings, 1 block)": dict(
        method="jko", data="rose", blocks=1, steps=60, n_val=500, n_test=500
    ),
}

CHILD = r"""
import json, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[2]))
from iterflow.train import TrainConfig, train
fields = json.loads(sys.argv[1])
if "hidden" in fields:
    fields["hidden"] = tuple(fields["hidden"])
method = fields.pop("method")
cfg = TrainConfig.for_method(method, **fields)
with tempfile.TemporaryDirectory() as d:
    r = train(cfg, Path(d) / "run")
h = r.history[0]
print(json.dumps({"seconds": h["seconds_optimize"], "steps": cfg.steps, "autocast": h.get("autocast")}))
"""


def worktree(rev: str, where: Path) -> Path:
    """A detached worktree of ``rev`` under ``where``."""
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "worktree", "add", "-f", "--detach", str(path), rev],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return path


def run_case(tree: Path, fields: dict[str, object], threads: int, img2d: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads),
           "ITERFLOW_IMG2D_DIR": img2d}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(fields), str(threads)],
        cwd=tree, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--old", required=True, help="git revision of the baseline")
    ap.add_argument("--new", default="HEAD", help="git revision to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", nargs="*", default=None, help="substrings of the case names to run")
    ap.add_argument("--img2d-dir", default=str(ROOT.parent / "shared" / "data" / "img2d"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cases = {k: v for k, v in CASES.items() if not args.cases or any(c in k for c in args.cases)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {rev: worktree(rev, Path(tmp)) for rev in (args.old, args.new)}
        try:
            speeds: dict[str, dict[str, list[float]]] = {c: {r: [] for r in trees} for c in cases}
            for i in range(args.rounds):
                for case, fields in cases.items():
                    for rev, tree in trees.items():  # interleaved: old, new, old, new, ...
                        res = run_case(tree, dict(fields), args.threads, args.img2d_dir)
                        speeds[case][rev].append(res["steps"] / res["seconds"])
                print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                               capture_output=True)  # fmt: skip
    rows = []
    for case, by_rev in speeds.items():
        old, new = (statistics.median(by_rev[r]) for r in (args.old, args.new))
        paired = [n / o for o, n in zip(by_rev[args.old], by_rev[args.new], strict=True)]
        rows.append({"case": case, "old_steps_per_s": old, "new_steps_per_s": new,
                     "ratio_new_over_old": new / old,
                     "paired_median": statistics.median(paired), "paired_min": min(paired),
                     "paired_max": max(paired),
                     "old_all": by_rev[args.old], "new_all": by_rev[args.new]})  # fmt: skip
    machine = {"threads": args.threads, "rounds": args.rounds, "load_before": load_before,
               "load_after": os.getloadavg(), "old": args.old, "new": args.new}  # fmt: skip
    print(f"machine: {machine}")
    print(f"| case | {args.old} steps/s | {args.new} steps/s | new / old | paired per round: "
          "median (range) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['old_steps_per_s']:.2f} | {r['new_steps_per_s']:.2f} | "
              f"{r['ratio_new_over_old']:.3f} | {r['paired_median']:.3f} "
              f"({r['paired_min']:.2f}-{r['paired_max']:.2f}) |")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
