"""What subnormal floats cost a long training run, and what flushing them to zero changes.

    python benchmarks/bench_denormals.py [--train-steps 60000] [--steps 1500] [--rounds 3]
        [--threads 2] [--workdir DIR] [--out benchmarks/results/denormals.json]

1. Trains the rose's flow-matching preset (``--preset rose-fm-fourier``: 3 x 256 SiLU MLP with 128
   random Fourier features of x, lr 8e-3, cosine over ``--total-steps``) for ``--train-steps``
   steps into ``DIR/run`` (kept and reused when it is already there), in a child process with
   flushing on (:mod:`iterflow.core.denormals`).
2. Counts, on one training batch of that checkpoint's live weights (flushing off), the hidden
   layers' exactly-zero outputs and the subnormal values of the forward and backward pass.
3. Resumes copies of that checkpoint for ``--steps`` more steps, ``--rounds`` times with flushing
   off (``ITERFLOW_FLUSH_DENORMALS=0``) and on, each in its own process started with
   ``OMP_NUM_THREADS=--threads`` (the setting must precede PyTorch's worker threads), the two
   interleaved and alternating in order round by round; reports steps/s (medians) and the largest
   difference between the weights, the EMA weights and the Adam moments the two end with.

A fresh run of the same preset is timed the same way for reference (``fresh``): the steps/s a run
starts with, before its units die. Run alone on the machine; the load is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import machine, write_json  # noqa: E402  (flushes subnormals unless turned off)

from iterflow.core.denormals import pool_flushes  # noqa: E402
from iterflow.train import TrainConfig  # noqa: E402

TINY = torch.finfo(torch.float32).tiny


def config(args: argparse.Namespace) -> TrainConfig:
    """The preset as ``iterflow train --config`` reads it, with ``--total-steps`` (resolved once by
    the parent and handed to the children as ``--config-json``)."""
    if args.config_json:
        return TrainConfig.from_json(json.loads(Path(args.config_json).read_text()))
    from bench_anytime import preset_config

    cfg = preset_config(args.preset, "fm", args.data)
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    return dataclasses.replace(cfg, steps=args.total_steps, img2d_dir=args.img2d_dir, **changes)


def train_to(cfg: TrainConfig, folder: Path, start: int, n: int) -> float:
    """Train ``cfg`` in ``folder`` from its checkpoint at step ``start`` (0: a new run) for ``n``
    steps, ending on an in-stage checkpoint (``bench_anytime.train_segment``); returns the seconds."""
    from bench_anytime import dataset_tensors, train_segment

    data, _, _ = dataset_tensors(cfg, 5000)
    t0 = time.perf_counter()
    train_segment(cfg, data, folder, start + n, n)
    return time.perf_counter() - t0


def census(cfg: TrainConfig, folder: Path) -> dict[str, Any]:
    """Exactly-zero hidden outputs and subnormal values of one batch's forward and backward pass
    (a flow-matching loss at uniform times) through the checkpoint's EMA weights (the model a
    checkpoint stands for in ``bench_anytime``), run with flushing off."""
    from bench_anytime import checkpoint_flow, dataset_tensors

    data, _, _ = dataset_tensors(cfg, 5000)
    flow = checkpoint_flow(folder, cfg, tuple(data.train.shape[1:]))
    net = flow.blocks[0].velocity
    g = torch.Generator().manual_seed(1)
    rows = data.train[torch.randint(len(data.train), (cfg.batch_size,), generator=g)]
    x1 = (rows - flow.shift) / flow.scale  # the rows as the trainer sees them
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.rand(cfg.batch_size, generator=g)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    acts: list[torch.Tensor] = []
    sub = {"forward": 0, "backward": 0}

    def count(v: torch.Tensor) -> int:
        a = v.detach().float().abs()
        return int(((a > 0) & (a < TINY)).sum())

    hooks = []
    for m in net.modules():
        if isinstance(m, torch.nn.SiLU):
            hooks.append(m.register_forward_hook(lambda m, i, o: acts.append(o)))
        if not list(m.children()):
            hooks.append(m.register_forward_hook(
                lambda m, i, o: sub.__setitem__("forward", sub["forward"] + count(o))))  # fmt: skip
            hooks.append(m.register_full_backward_hook(
                lambda m, gi, go: sub.__setitem__("backward", sub["backward"] + sum(
                    count(v) for v in gi if v is not None))))  # fmt: skip
    loss = ((net(xt, t) - (x1 - x0)) ** 2).mean()
    loss.backward()
    grads = sum(count(p.grad) for p in net.parameters())
    for h in hooks:
        h.remove()
    return {
        "zero_fraction_per_hidden_layer": [float((a == 0).float().mean()) for a in acts],
        "subnormal_forward": sub["forward"],
        "subnormal_backward": sub["backward"],
        "subnormal_weight_grads": grads,
    }


def child(args: argparse.Namespace) -> None:
    """A child's work (``--child train|resume|fresh|census``), printed as one JSON line."""
    torch.set_num_threads(args.threads)
    cfg = config(args)
    folder = Path(args.folder)
    if args.child == "train":
        out = {"seconds": train_to(cfg, folder, 0, args.train_steps)}
    elif args.child == "census":
        out = census(cfg, folder)
    else:
        start = args.train_steps if args.child == "resume" else 0
        out = {"steps_per_s": args.steps / train_to(cfg, folder, start, args.steps)}
    print(json.dumps({**out, "flush": pool_flushes()}), flush=True)


def spawn(args: argparse.Namespace, kind: str, folder: Path, flush: bool) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "ITERFLOW_FLUSH_DENORMALS": "1" if flush else "0"}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder)]
    for k in ("config_json", "train_steps", "steps", "threads"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diffs(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference per kind of tensor between two checkpoints."""
    from safetensors.torch import load_file

    sa, sb = load_file(str(a)), load_file(str(b))
    out = {"param": 0.0, "ema": 0.0, "opt": 0.0}
    for k, v in sa.items():
        kind = k.split(".")[0]
        if kind in out and v.dtype.is_floating_point:
            out[kind] = max(out[kind], float((v.double() - sb[k].double()).abs().max()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--preset", default="rose-fm-fourier")
    ap.add_argument("--data", default="rose")
    ap.add_argument("--img2d-dir", default=None, help="the papers' 2-D densities (rose, tree)")
    ap.add_argument("--total-steps", type=int, default=584_255,
                    help="the run's length (its cosine schedule); default: the first, stopped "
                         "two-thread hour's")  # fmt: skip
    ap.add_argument("--train-steps", type=int, default=60_000, help="steps before the timing")
    ap.add_argument("--steps", type=int, default=1500, help="steps per timed segment")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="change a TrainConfig field of the preset (tests, quick looks)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="keep the run here (reused when present)")
    ap.add_argument("--out", default=str(HERE / "results" / "denormals.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    work = Path(args.workdir or f"/tmp/bench_denormals_{os.getpid()}")
    run = work / "run"
    work.mkdir(parents=True, exist_ok=True)
    cfg_json = json.dumps(config(args).to_json())
    args.config_json = str(work / "config.json")
    Path(args.config_json).write_text(cfg_json)
    load_before = os.getloadavg()
    progress = run / "progress.json"
    if not (progress.is_file() and json.loads(progress.read_text())["step"] == args.train_steps):
        shutil.rmtree(run, ignore_errors=True)
        print(f"training {args.train_steps} steps into {run} ...", flush=True)
        print(" ", spawn(args, "train", run, True), flush=True)
    cen = spawn(args, "census", run, False)
    print("census:", cen, flush=True)
    times: dict[str, list[float]] = {"resume_off": [], "resume_on": [], "fresh_off": [],
                                     "fresh_on": []}  # fmt: skip
    for r in range(args.rounds):
        for flush in (False, True) if r % 2 == 0 else (True, False):
            tag = "on" if flush else "off"
            seg = work / f"resume_{tag}"
            shutil.rmtree(seg, ignore_errors=True)
            shutil.copytree(run, seg)
            res = spawn(args, "resume", seg, flush)
            if res["flush"] != flush:
                raise RuntimeError(f"the child's flushing is {res['flush']}, wanted {flush}")
            times[f"resume_{tag}"].append(res["steps_per_s"])
            fresh = work / f"fresh_{tag}"
            shutil.rmtree(fresh, ignore_errors=True)
            times[f"fresh_{tag}"].append(spawn(args, "fresh", fresh, flush)["steps_per_s"])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()), flush=True)
    diffs = max_diffs(work / "resume_off" / "progress.safetensors",
                      work / "resume_on" / "progress.safetensors")  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"machine": {**machine(), "threads": args.threads}, "load_before": load_before,
              "load_after": os.getloadavg(), "settings": {k: v for k, v in vars(args).items()
                                                          if k not in ("child", "folder")},
              "census": cen, "steps_per_s": times, "median": med,
              "speedup_resumed": med["resume_on"] / med["resume_off"],
              "max_diff_after_resume": diffs}  # fmt: skip
    write_json(args.out, result)
    print(f"steps/s at step {args.train_steps} (medians of {args.rounds}, {args.threads} threads): "
          f"subnormals computed {med['resume_off']:.1f}, flushed {med['resume_on']:.1f} "
          f"({result['speedup_resumed']:.2f}x); a fresh run {med['fresh_off']:.1f} / "
          f"{med['fresh_on']:.1f}")  # fmt: skip
    print(f"largest difference after {args.steps} steps, flushed vs not: {diffs}")


if __name__ == "__main__":
    main()
