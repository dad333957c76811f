"""The named recipes of ``iterflow train --config NAME`` (issue 15, item 2): each preset trained from
the command line exactly as a user runs it, its test NLL (the run's ``metrics.json``: exact trace,
dopri5 at 1e-5, ``--eval-n`` test points, ± standard error) against its training seconds, with the
thread count and the load average before and after.

A run folder that already holds a finished run of the same preset (its ``config.json`` equal to the
preset's, ``out`` aside, and a ``metrics.json``) is recorded as it is, not trained again: the CLI
resumes a finished run by only re-writing its report. Extra ``iterflow train`` flags (``--set``)
make a variant; they are recorded next to the figures, and they change the config, so they train a
new run (in ``--runs``/``NAME-FLAGS``, e.g. ``rose-jko-long-blocks14``). ``--record-only`` never
trains.

Outputs: ``benchmarks/results/presets.json`` (merged with the runs recorded before, by key
``NAME`` or ``NAME + flags``) and a Markdown table on stdout.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_presets.py --preset tree-local-fm-long --threads 1 \\
        --img2d-dir ../shared/data/img2d --runs runs/presets
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOT_RECIPE = ("out", "img2d_dir", "report", "eval_n", "tensorboard")  # where and how, not what
KEPT = ("nll", "nll_stderr", "entropy", "nll_gap", "train_seconds", "w2", "precision", "recall")


def preset_config(name: str, flags: list[str]) -> dict[str, Any]:
    """The recipe (TrainConfig as JSON, :func:`comparable`) ``iterflow train --config NAME FLAGS``
    would run."""
    out = subprocess.run(
        [sys.executable, "-m", "iterflow.cli", "train", "--config", name, *flags, "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return comparable(tomllib.loads(out))


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config without the fields that do not change the trained model's recipe."""
    return {k: v for k, v in cfg.items() if k not in NOT_RECIPE}


def run_preset(
    name: str, flags: list[str], run: Path, eval_n: int, threads: int, record_only: bool = False
) -> dict[str, Any]:
    """Train (or resume, or record) ``name`` into ``run``; its metrics and how they were made."""
    want = preset_config(name, flags)
    recorded = False
    if (run / "metrics.json").is_file() and (run / "config.json").is_file():
        have = comparable(json.loads((run / "config.json").read_text()))
        if {k: have.get(k) for k in want} != want:
            raise SystemExit(f"error: --runs: {run} holds another config than preset {name!r}")
        recorded = True
    load_before = os.getloadavg()
    cmd = ["iterflow", "train", "--config", name, *flags, "--out", str(run)]
    cmd += ["--eval-n", str(eval_n), "--quiet"]
    if not recorded and record_only:
        raise SystemExit(f"error: --record-only: {run} holds no finished run of preset {name!r}")
    if not recorded:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-m", "iterflow.cli", *cmd[1:]], check=True, env=env)
    metrics = json.loads((run / "metrics.json").read_text())
    row: dict[str, Any] = {"preset": name, "flags": " ".join(flags)}
    row.update({k: metrics.get(k) for k in KEPT})
    row["blocks"] = metrics.get("blocks")
    row["command"] = f"OMP_NUM_THREADS={threads} " + shlex.join(cmd)
    row["threads"] = threads
    row["recorded_from_existing_run"] = recorded
    row["load_before"] = None if recorded else list(load_before)
    row["load_after"] = None if recorded else list(os.getloadavg())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", action="append", required=True, help="preset name (repeatable)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FLAGS",
        help="extra iterflow train flags for every preset, e.g. '--blocks 14' (one string)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-n", type=int, default=5000)
    ap.add_argument("--runs", default="runs/presets", help="folder of the run folders")
    ap.add_argument("--img2d-dir", default=os.environ.get("ITERFLOW_IMG2D_DIR"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "presets.json"))
    ap.add_argument(
        "--record-only", action="store_true", help="never train: record finished runs only"
    )
    args = ap.parse_args()
    if args.img2d_dir:
        os.environ["ITERFLOW_IMG2D_DIR"] = str(Path(args.img2d_dir).resolve())
    flags = [f for chunk in args.set for f in shlex.split(chunk)]
    suffix = "".join(f.strip("-").replace("=", "") for f in flags)
    rows = []
    for name in args.preset:
        run = Path(args.runs) / (name + (f"-{suffix}" if suffix else ""))
        rows.append(run_preset(name, flags, run, args.eval_n, args.threads, args.record_only))
    out = Path(args.out)
    store = json.loads(out.read_text()) if out.is_file() else {}
    store.setdefault("runs", {})
    for row in rows:
        store["runs"][(row["preset"] + " " + row["flags"]).strip()] = row
    store["machine"] = {**machine(), "threads": args.threads}
    write_json(str(out), store)
    print(f"machine: {store['machine']}\n")
    cols = ["preset", "flags", "blocks", "train_seconds", "nll", "nll_stderr", "nll_gap"]
    print(table(list(store["runs"].values()), cols))


if __name__ == "__main__":
    main()
