"""Images benchmark: bits/dim and FD (local classifier features) against NFE for flow matching,
local flow matching and reflow on 8x8 digits and Fashion-MNIST, at a small CPU budget.

Run by hand (not by CI), single-threaded:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_images.py --out benchmarks/results/images.json

Each (data set, method) is trained with :func:`iterflow.train.train` into ``--work/DATA/METHOD``
(an interrupted benchmark resumes its runs), then evaluated with
:func:`iterflow.evaluation.image_eval.evaluate_images`:
bits/dim on held-out images (Hutchinson, one Rademacher probe, dopri5), the Fréchet distance on the
features of a classifier trained on the same data (cached; *not* Inception FID) for an adaptive
reference sampler and for Euler with 1..32 evaluations per image, and the nearest-training-image
distance ratio.
Sample grids are written next to the runs (``--grids``). ``--eval-run LABEL=RUN`` adds an existing
run folder (e.g. one trained from the CLI) to the table, evaluated the same way.

Columns: ``steps`` are this run's optimiser steps (all blocks; reflow's exclude its flow-matching
source); ``train s`` wall / CPU seconds of training; ``FD ref (NFE)`` the FD of the adaptive
reference sampler and its NFE per image; ``FD@k`` the FD of Euler samples with ``k`` velocity
evaluations per image in total (``-``: a chain of ``b`` blocks needs ``b`` at least); ``FD test/train``
the FD of held-out images (it is biased upward when the test split is small: 200 images for digits);
``NN ratio`` the mean nearest-training-image distance of samples over that of test images (about 1:
no copying).

Larger runs on a GPU: the same commands with ``--device cuda`` (and, for the U-Net, the net
option ``autocast=bf16``; bits/dim are always computed in float32), e.g. (183 s on one H100,
docs/images/README.md)

    iterflow train --data fashion-mnist --network unet --net-option channels=64 \\
        --net-option 'channel_mult=[1,2,2]' --net-option num_res_blocks=2 --net-option autocast=bf16 \\
        --steps 3442 --batch-size 256 --lr 5e-4 --n-val 256 --device cuda --no-report --out runs/fm-gpu
    iterflow image-eval runs/fm-gpu --device cuda --n-bpd 1000 --n-samples 5000 --classifier-steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import iterflow.core.nn.unet  # noqa: F401  (registers the U-Net)
import iterflow.data.images  # noqa: F401  (registers the image data sets)
from iterflow.evaluation.feature_classifier import ClassifierConfig
from iterflow.evaluation.image_eval import ImageEvalOptions, evaluate_image_run
from iterflow.methods import METHODS
from iterflow.train import TrainConfig, load_run, train

# Recipes: the CPU budget of each data set (stated in the table).
RECIPES: dict[str, dict[str, Any]] = {
    "digits8": {
        "train": dict(
            network="unet",
            net_options={"channels": 16, "channel_mult": [1, 2]},
            steps=1500,
            batch_size=128,
            lr=2e-3,
            ema=0.995,
            n_val=100,
            n_test=200,
        ),
        "local_fm": {
            "blocks": 4,
            "options": {
                "hs": (0.25, 0.5, 1.0),
                "final_block": True,
                "push_steps": 8,
                "report_n": 200,
            },
        },
        "reflow": {"steps": 750, "options": {"n_pairs": 4000, "pair_steps": 16}},
        "eval": dict(n_bpd=200, n_samples=1000),
        "classifier_steps": 800,
    },
    "fashion-mnist": {  # the README's CLI recipe (see docs/images/)
        "train": dict(
            network="unet",
            net_options={"channels": 16, "channel_mult": [1, 2, 2]},
            steps=1500,
            batch_size=64,
            lr=2e-3,
            ema=0.995,
            n_val=64,
        ),
        "local_fm": {
            "blocks": 4,
            "options": {
                "hs": (0.25, 0.5, 1.0),
                "final_block": True,
                "push_steps": 4,
                "report_n": 64,
            },
        },
        "reflow": {"steps": 750, "options": {"n_pairs": 2000, "pair_steps": 8}},
        "eval": dict(n_bpd=100, n_samples=1000),
        "classifier_steps": 800,
    },
    "fashion-mnist-14": {
        "train": dict(
            network="unet",
            net_options={"channels": 16, "channel_mult": [1, 2]},
            steps=2000,
            batch_size=64,
            lr=2e-3,
            ema=0.995,
            n_train=10_000,
            n_val=100,
            n_test=1000,
        ),
        "local_fm": {
            "blocks": 4,
            "options": {
                "hs": (0.25, 0.5, 1.0),
                "final_block": True,
                "push_steps": 4,
                "report_n": 100,
            },
        },
        "reflow": {"steps": 1000, "options": {"n_pairs": 4000, "pair_steps": 8}},
        "eval": dict(n_bpd=200, n_samples=1000),
        "classifier_steps": 800,
    },
}
NFES = (1, 2, 4, 8, 16, 32)


def quick(recipe: dict[str, Any]) -> dict[str, Any]:
    """A smoke-test version of a recipe (--quick): a few steps everywhere."""
    r = json.loads(json.dumps(recipe))
    r["train"].update(steps=20, n_train=400, n_test=100)
    r["local_fm"]["options"]["report_n"] = 20
    r["reflow"] = {
        "steps": 10,
        "options": {**r["reflow"]["options"], "n_pairs": 64, "pair_steps": 2},
    }
    r["eval"] = dict(n_bpd=16, n_samples=100, bpd_solver="rk4", bpd_steps=2, solver="rk4", steps=2)
    r["classifier_steps"] = 20
    return r


def configs(
    data: str, recipe: dict[str, Any], methods: list[str], work: Path, device: str
) -> list[tuple[str, TrainConfig]]:
    """One training config per method (reflow's source is the flow-matching run)."""
    base = TrainConfig(
        data=data, device=device, log_every=50, checkpoint_every=250, **recipe["train"]
    )
    out = []
    if "fm" in methods or "reflow" in methods:
        out.append(("fm", base))
    if "local-fm" in methods:
        lfm = recipe["local_fm"]
        per_block = max(1, base.steps // lfm["blocks"])  # the same total optimiser steps as FM
        out.append(
            (
                "local-fm",
                dataclasses.replace(
                    base,
                    method="local-fm",
                    blocks=lfm["blocks"],
                    steps=per_block,
                    options=dict(lfm["options"]),
                ),
            )
        )
    if "reflow" in methods:
        rf = recipe["reflow"]
        opts = {
            "source": str(work / data / "fm"),
            "pairs": str(work / data / "reflow_pairs.safetensors"),
            **rf["options"],
        }
        out.append(
            ("reflow", dataclasses.replace(base, method="reflow", steps=rf["steps"], options=opts))
        )
    return out


def evaluate_run(
    run: Path,
    data: str,
    recipe: dict[str, Any],
    grids: Path,
    label: str,
    seed: int,
    cache_dir: str | None,
    device: str,
    train_cpu: float | None = None,
) -> dict[str, Any]:
    opts = ImageEvalOptions(
        nfes=NFES,
        seed=seed,
        cache_dir=cache_dir,
        classifier=ClassifierConfig(steps=recipe["classifier_steps"]),
        **recipe["eval"],
    )
    t0, c0 = time.perf_counter(), time.process_time()
    ev = evaluate_image_run(
        run,
        opts,
        grid=grids / f"{data}_{label}.png",
        trajectory=grids / f"{data}_{label}_traj.png",
        title=f"{label} on {data}",
        device=device,
    )
    m, flow, cfg, meta = ev.metrics, ev.flow, ev.config, ev.meta
    m.update(
        method=cfg.method,
        label=label,
        run=str(run),
        train_steps=cfg.steps * flow.num_blocks,
        n_train=ev.n_train,
        event_shape=list(flow.event_shape),
        train_seconds=meta.get("train_seconds"),
        eval_wall_seconds=time.perf_counter() - t0,
        eval_cpu_seconds=time.process_time() - c0,
        train_cpu_seconds=train_cpu,
        network=meta["networks"][0],
    )
    return m


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "data",
        "method",
        "HxW",
        "n_train",
        "steps",
        "train s (wall/CPU)",
        "bits/dim",
        "FD ref (NFE)",
        *[f"FD@{k}" for k in NFES],
        "FD test/train",
        "NN ratio",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        bpd = r.get("bits_per_dim", {})
        by = r["fd_local_classifier_by_nfe"]
        cells = [
            r["data"],
            r["label"],
            "x".join(map(str, r["event_shape"][1:])),
            str(r["n_train"]),
            str(r["train_steps"]),
            _seconds(r),
            f"{bpd['bpd']:.3f} ± {bpd['stderr']:.3f}" if bpd else "-",
            f"{r['fd_local_classifier']:.3g} ({r['sampler']['nfe_per_image']})",
            *[f"{by[k]:.3g}" if k in by else "-" for k in map(str, NFES)],
            f"{r['fd_test_vs_train']:.3g}",
            f"{r['nearest_train']['ratio']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _seconds(r: dict[str, Any]) -> str:
    wall = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
    cpu = f"{r['train_cpu_seconds']:.0f}" if r.get("train_cpu_seconds") else "-"
    return f"{wall}/{cpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits8,fashion-mnist-14", help="comma-separated data sets")
    ap.add_argument("--methods", default="fm,local-fm,reflow", help="comma-separated methods")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_images"), help="run folders")
    ap.add_argument(
        "--grids", type=Path, default=Path("runs/bench_images/grids"), help="PNG folder"
    )
    ap.add_argument("--cache-dir", default=None, help="feature-classifier cache")
    ap.add_argument(
        "--eval-run",
        action="append",
        default=[],
        metavar="LABEL=RUN",
        help="also evaluate an existing run folder (repeatable)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps everywhere")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument(
        "--render", type=Path, default=None, help="only print the table of a saved JSON"
    )
    args = ap.parse_args()
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(f"machine: {saved['machine']}\n\n{table(saved['rows'])}")
        return
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if m not in METHODS]
    if missing:
        print(f"skipping methods not in this checkout: {missing}")
        methods = [m for m in methods if m in METHODS]
    rows: list[dict[str, Any]] = []
    for data in [d for d in args.data.split(",") if d]:
        recipe = quick(RECIPES[data]) if args.quick else RECIPES[data]
        for label, cfg in configs(data, recipe, methods, args.work, args.device):
            run = args.work / data / label
            t0, c0 = time.perf_counter(), time.process_time()
            train(cfg, run)
            cpu = time.process_time() - c0
            print(
                f"{data}/{label}: trained in {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} s CPU "
                "(this call; 0 if the run was already complete)",
                flush=True,
            )
            if label in methods:
                rows.append(
                    evaluate_run(
                        run,
                        data,
                        recipe,
                        args.grids,
                        label,
                        args.seed,
                        args.cache_dir,
                        args.device,
                        train_cpu=cpu,
                    )
                )
                print(table(rows[-1:]), flush=True)
    for spec in args.eval_run:
        label, _, path = spec.partition("=")
        _, cfg, _ = load_run(path)
        recipe = RECIPES.get(cfg.data, RECIPES["fashion-mnist-14"])
        recipe = quick(recipe) if args.quick else recipe
        rows.append(
            evaluate_run(
                Path(path),
                cfg.data,
                recipe,
                args.grids,
                label,
                args.seed,
                args.cache_dir,
                args.device,
            )
        )
        print(table(rows[-1:]), flush=True)
    machine = (
        f"{_cpu_name()} ({os.cpu_count()} cores, shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), device {args.device}"
    )
    print(f"\nmachine: {machine}\n")
    print(table(rows))
    if args.out is not None:
        args.out.write_text(
            json.dumps({"machine": machine, "rows": rows}, indent=1, default=str) + "\n"
        )


if __name__ == "__main__":
    main()
