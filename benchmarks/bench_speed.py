"""Speed of iterflow next to the established flow-matching libraries, in one interleaved run.

    python benchmarks/bench_speed.py [--rounds 5] [--threads 1] [--out bench_out/speed.json]
    python benchmarks/bench_speed.py --quality 6000   # also: fp32 vs bf16-autocast model quality
    python benchmarks/bench_speed.py --skip train ot inference --like-run runs/demo  # likelihood only

What it measures (all on the same network: 3 hidden layers of 256, SiLU, input ``[x, t]``; batch
1,024; checkerboard data sampled by index from one pre-generated tensor; Adam):

1. GEMM peak of this machine: FLOP/s of a large ``torch.matmul`` in float32 and bfloat16.
2. Training steps/s, interleaved round by round so that load from other processes hits every
   contender alike (the median over rounds is reported):
   * iterflow's trainer (``iterflow.train.train``; includes its EMA, gradient clipping, learning-rate
     schedule and logging) with its defaults (``autocast=auto``) and with ``autocast=none``;
     couplings ``independent``, ``ot`` with ``ot_solver=auto`` (the compiled pairing in line where
     numba is installed, and the NumPy pairing in a background thread, as without it) and exact
     whole-batch ``ot_solver=emd``;
   * torchcfm 1.0.7: ``ConditionalFlowMatcher`` and ``ExactOptimalTransportConditionalFlowMatcher``;
   * Meta's flow_matching 1.0.10: ``AffineProbPath(CondOTScheduler())``, independent and with an exact
     POT assignment of each batch (the library has no OT coupling of its own).
   The libraries run in plain training loops written as their documentation shows (float32).
   Each round of each contender runs in a process of its own (``--in-process``: all in this
   one), so that no contender inherits another's allocator state; one more row gives torchcfm's
   loop the allocator settings of :mod:`iterflow.core.allocator` through glibc's ``MALLOC_*``
   environment variables (what keeping freed memory in the process is worth).
   The fraction of the GEMM peak reached counts the step's matrix-multiply FLOPs only.
3. Minibatch-OT couplings: time and quality (transport cost relative to the exact whole-batch
   assignment) of every solver, per batch size.
4. Sampling (samples/s at NFE 32, Euler) and likelihood evaluation (points/s, exact trace and
   Hutchinson) of a flow with the same network, and per-evaluation costs of ways to compute the exact
   divergence (batched backward as in ``iterflow.ode``, a loop of backward passes, ``torch.func``,
   the one forward pass of ``iterflow.core.nn.mlp_jacobian``).
5. Likelihood (section ``likelihood``, :mod:`speed_likelihood`): exact NLL of trained models (the
   demo's 2-D checkerboard, Gaussian mixtures in 10, 32 and 64 dimensions) by ``Flow.log_prob``
   against the plain torchdiffeq evaluator a user writes (dopri5 on ``(x, logp)``, one backward
   pass per dimension, ``atol = rtol = 1e-5``): points/s, NFE, NLL differences and errors against a
   tight reference; and the optimiser steps/s of the CNF and JKO-flow rose recipes through the
   one-pass Jacobian terms (eager, bf16 autocast, ``torch.compile``, compiled under bf16 autocast)
   and through autograd (the step before the one-pass terms); ``--like-parts training`` runs the
   latter alone. ``--like-parts work-precision`` (not run by default) compares the evaluators at
   equal accuracy instead of equal tolerance: each at several tolerances, the plain evaluator's
   seconds at iterflow's per-point errors read off its own curve (``--wp-plot`` draws the curves).
   Threads and load average are recorded.
6. Quality per second (section ``demo``): ``make demo``'s training (the preset ``DEMO_PRESET``)
   and flow matching's recommended settings (``iterflow train`` without a config), their seconds
   and test NLL gap to ``log 32`` (median seconds of ``--demo-repeats`` interleaved runs; with
   the preset's time budget the step count varies, and every run is evaluated);
   ``--demo-change JSON`` adds variants of the recommended settings.
7. A table of issue 14's targets against what the run measured.

The libraries are optional benchmark extras: ``pip install --no-deps torchcfm flow_matching`` next to
a CPU build of torch (see ``pyproject.toml``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    checkerboard_model_units,
    machine,
    ot_batches,
    table,
    write_json,
)
from speed_likelihood import (  # noqa: E402
    bench_likelihood_eval,
    bench_likelihood_training,
    bench_work_precision,
    bf16_native,
    gemm_peak,
    likelihood_cases,
    nll_allowed,
    plot_work_precision,
)
from speed_likelihood import load as likelihood_load  # noqa: E402

from iterflow.core import couplings  # noqa: E402
from iterflow.core.allocator import SETTINGS as ALLOCATOR_SETTINGS  # noqa: E402
from iterflow.core.couplings import (
    assignment,
    chunked_assignment,
    ot_permutation,
    sinkhorn_pairing,
    transport_cost,
)
from iterflow.core.flow import Block, Flow  # noqa: E402
from iterflow.core.nn import MLPVelocity  # noqa: E402
from iterflow.core.ode import divergence_exact, divergence_hutchinson  # noqa: E402
from iterflow.data import get_dataset  # noqa: E402
from iterflow.train import TrainConfig, cpu_has_native_bf16, train  # noqa: E402

HIDDEN = (256, 256, 256)
BATCH = 1024


def step_flops(batch: int = BATCH, dim: int = 2, hidden: tuple[int, ...] = HIDDEN) -> float:
    """Matrix-multiply FLOPs of one training step of the MLP on ``[x, t]``.

    Forward ``2 B sum(in*out)``; backward the weight gradients (same again) and the input gradients
    of every layer but the first (whose input needs none).
    """
    sizes = [dim + 1, *hidden, dim]
    layers = list(zip(sizes[:-1], sizes[1:]))
    fwd = sum(a * b for a, b in layers)
    return 2.0 * batch * (2 * fwd + sum(a * b for a, b in layers[1:]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ConcatMLP(nn.Module):
    """The libraries' network: an MLP on ``[x, t]`` (3 hidden layers of 256, SiLU)."""

    def __init__(self, dim: int = 2, hidden: tuple[int, ...] = HIDDEN) -> None:
        super().__init__()
        sizes = [dim + 1, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden[-1], dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))


# ------------------------------------------------------------------------------------------------
# Training contenders: each returns a function that runs `steps` optimiser steps and returns seconds
# ------------------------------------------------------------------------------------------------


def library_loop(kind: str, data: Tensor, seed: int) -> Callable[[int], float]:
    """A plain training loop of torchcfm or flow_matching, as their documentation writes it."""
    torch.manual_seed(seed)
    model = ConcatMLP().to(data.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    if kind.startswith("torchcfm"):
        from torchcfm.conditional_flow_matching import (
            ConditionalFlowMatcher,
            ExactOptimalTransportConditionalFlowMatcher,
        )

        fm = (
            ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
            if kind.endswith("ot")
            else ConditionalFlowMatcher(sigma=0.0)
        )

        def loss_fn(x1: Tensor) -> Tensor:
            x0 = torch.randn_like(x1)
            t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
            return torch.mean((model(xt, t) - ut) ** 2)

    else:
        import ot
        from flow_matching.path import AffineProbPath
        from flow_matching.path.scheduler import CondOTScheduler

        path = AffineProbPath(scheduler=CondOTScheduler())
        w = np.full(BATCH, 1.0 / BATCH)

        def loss_fn(x1: Tensor) -> Tensor:
            x0 = torch.randn_like(x1)
            if kind.endswith("ot"):
                cost = torch.cdist(x0, x1).pow(2).double().cpu().numpy()
                x1 = x1[torch.as_tensor(ot.emd(w, w, cost).argmax(1), device=x1.device)]
            t = torch.rand(x1.shape[0], device=x1.device)
            sample = path.sample(t=t, x_0=x0, x_1=x1)
            return torch.pow(model(sample.x_t, sample.t) - sample.dx_t, 2).mean()

    def run(steps: int) -> float:
        _sync(data.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, data.shape[0], (BATCH,), generator=gen, device=data.device)
            opt.zero_grad()
            loss_fn(data[idx]).backward()
            opt.step()
        _sync(data.device)
        return time.perf_counter() - t0

    return run


def iterflow_run(
    options: dict[str, Any], autocast: str, device: str, seed: int
) -> Callable[[int], float]:
    """iterflow's trainer on the same network (``time_freqs=0``: the first layer sees ``[x, t]``)."""

    def run(steps: int) -> float:
        cfg = TrainConfig(
            data="checkerboard",
            steps=steps,
            batch_size=BATCH,
            hidden=HIDDEN,
            time_freqs=0,
            n_train=100_000,
            n_val=256,
            n_test=256,
            checkpoint_every=10**6,
            seed=seed,
            device=device,
            autocast=autocast,
            options=options,
        )
        with tempfile.TemporaryDirectory() as tmp:
            result = train(cfg, Path(tmp) / "run")
        return float(result.history[0]["seconds_optimize"])

    return run


#: The training contenders: name -> (how to build its loop, coupling, library, extra environment).
#: ``("iterflow", options, autocast[, "numpy-pairing"])`` is :func:`iterflow_run` (the last: with
#: the NumPy OT pairing, as without numba), ``("library", kind)`` is
#: :func:`library_loop`. The last row gives a library loop the allocator settings of
#: :mod:`iterflow.core.allocator` (``ITERFLOW_MALLOC_TUNING=1``) through glibc's environment.
TRAIN_CONTENDERS: dict[str, tuple[tuple[Any, ...], str, str, dict[str, str]]] = {
    "iterflow (defaults)": (("iterflow", {}, "auto"), "independent", "iterflow", {}),
    "iterflow autocast=none": (("iterflow", {}, "none"), "independent", "iterflow", {}),
    "torchcfm ConditionalFlowMatcher": (("library", "torchcfm"), "independent", "torchcfm", {}),
    "flow_matching AffineProbPath": (
        ("library", "flow_matching"),
        "independent",
        "flow_matching",
        {},
    ),
    "iterflow ot (auto)": (("iterflow", {"coupling": "ot"}, "auto"), "ot", "iterflow", {}),
    "iterflow ot (auto, NumPy pairing)": (
        ("iterflow", {"coupling": "ot"}, "auto", "numpy-pairing"),
        "ot",
        "iterflow",
        {},
    ),
    "iterflow ot (emd, whole batch)": (
        ("iterflow", {"coupling": "ot", "ot_solver": "emd"}, "auto"),
        "ot (exact)",
        "iterflow",
        {},
    ),
    "torchcfm ExactOptimalTransportCFM": (("library", "torchcfm-ot"), "ot (exact)", "torchcfm", {}),
    "flow_matching + POT emd pairing": (
        ("library", "flow_matching-ot"),
        "ot (exact)",
        "flow_matching",
        {},
    ),
    "torchcfm ConditionalFlowMatcher, MALLOC_* tuned": (
        ("library", "torchcfm"),
        "independent",
        "torchcfm (allocator)",
        {f"MALLOC_{name[2:]}_": str(value) for name, _, value in ALLOCATOR_SETTINGS},
    ),
}

TRAIN_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import bench_speed as bs
spec, steps, seed, device, threads = json.loads(sys.argv[2])
torch.set_num_threads(threads)
run = bs.contender_loop(spec, seed, device)
run(3)  # warm-up: imports, allocator, kernels
print(json.dumps({"seconds": run(steps)}))
"""


def contender_loop(
    spec: list[Any] | tuple[Any, ...], seed: int, device: str
) -> Callable[[int], float]:
    """The timed loop of one :data:`TRAIN_CONTENDERS` entry's build spec."""
    if spec[0] == "iterflow":
        run = iterflow_run(dict(spec[1]), spec[2], device, seed)
        if "numpy-pairing" not in spec[3:]:
            return run

        def with_numpy_pairing(steps: int) -> float:  # as without numba: in a background thread
            with numpy_pairing():
                return run(steps)

        return with_numpy_pairing
    data = get_dataset("checkerboard").splits(100_000, 10, 10, seed).train.to(device)
    return library_loop(spec[1], data, seed)


def bench_training(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Steps/s of every :data:`TRAIN_CONTENDERS` entry, each round of each contender in a process of
    its own (``--in-process``: all in this one, without the row that needs its own environment)."""
    dev = str(device)
    names = [n for n in TRAIN_CONTENDERS if args.in_process is False or not TRAIN_CONTENDERS[n][3]]
    steps = {
        n: args.ot_steps if TRAIN_CONTENDERS[n][1] == "ot (exact)" else args.steps for n in names
    }
    here = str(Path(__file__).resolve().parent)

    def timed(name: str) -> float:
        spec, _, _, env = TRAIN_CONTENDERS[name]
        if args.in_process:
            return loops[name](steps[name])
        payload = json.dumps([spec, steps[name], args.seed, dev, args.threads])
        out = subprocess.run(
            [sys.executable, "-c", TRAIN_CHILD, here, payload],
            env={**os.environ, "OMP_NUM_THREADS": str(args.threads), **env},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])

    loops: dict[str, Callable[[int], float]] = {}
    if args.in_process:
        for n in names:
            loops[n] = contender_loop(TRAIN_CONTENDERS[n][0], args.seed, dev)
            loops[n](3)  # warm-up (imports, allocator, kernels)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            rates[n].append(steps[n] / timed(n))
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    flops = step_flops()
    rows = []
    for n in names:
        med = statistics.median(rates[n])
        rows.append(
            {
                "contender": n,
                "library": TRAIN_CONTENDERS[n][2],
                "coupling": TRAIN_CONTENDERS[n][1],
                "steps_per_s": med,
                "min": min(rates[n]),
                "max": max(rates[n]),
                "gflop_per_s": med * flops / 1e9,
                "rates": rates[n],
            }
        )
    return rows


def paired_ratio(ours: list[float], peers: list[list[float]]) -> dict[str, float]:
    """The median over rounds of ``ours[r] / max(peer[r] for peer in peers)``, with its range.

    Each round runs every contender back to back, so a round's ratio cancels what changes slowly
    between rounds (the machine's clock and its neighbours: the Intel Xeon host's fp32 GEMM peak
    measured 148-312 GFLOP/s within half an hour). The ratio of the medians (``summary``'s main
    figures, the issue's definition) does not pair the rounds and swings with that drift; both are
    reported. Measured: pairing did not narrow the spread on that host (the noise is inside a round;
    docs/benchmarks.md)."""
    if not peers or any(len(p) != len(ours) for p in peers) or not ours:
        raise ValueError(
            f"paired_ratio: every peer needs one rate per round of ours ({len(ours)}), "
            f"got {[len(p) for p in peers]}"
        )
    per_round = [o / max(p[r] for p in peers) for r, o in enumerate(ours)]
    return {
        "median": statistics.median(per_round),
        "min": min(per_round),
        "max": max(per_round),
    }


SUMMARY_KEYS = {
    "defaults": "iterflow_vs_fastest_library_independent",
    "fp32": "iterflow_fp32_vs_fastest_library_independent",
    "defaults_paired": "iterflow_vs_fastest_library_independent_paired",
    "fp32_paired": "iterflow_fp32_vs_fastest_library_independent_paired",
}


def combine_runs(paths: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The training ratios of several result files (``--combine``), a row per run, and each
    ratio's median over the runs that have it: one run's ratio swings with the machine."""
    rows = []
    for path in paths:
        summary = json.loads(Path(path).read_text()).get("summary")
        if not summary or SUMMARY_KEYS["defaults"] not in summary:
            raise ValueError(
                f"--combine: {path} has no training section (run without --skip train)"
            )
        rows.append(
            {"run": Path(path).stem, **{k: summary.get(v) for k, v in SUMMARY_KEYS.items()}}
        )
    medians = {
        k: statistics.median(vals)
        for k in SUMMARY_KEYS
        if (vals := [r[k] for r in rows if r[k] is not None])
    }
    return rows, medians


# ------------------------------------------------------------------------------------------------
# OT couplings
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def numpy_pairing() -> Iterator[None]:
    """Within it, ``ot_solver="auto"`` runs as without numba: the NumPy pairing (the default with
    numba installed is the compiled one, :func:`iterflow.core.couplings.compiled_pairing`)."""
    couplings.USE_COMPILED = False
    try:
        yield
    finally:
        couplings.USE_COMPILED = True


def numpy_auto(a: Tensor, b: Tensor) -> Tensor:
    """``ot_permutation(a, b)`` with the NumPy pairing (:func:`numpy_pairing`)."""
    with numpy_pairing():
        return ot_permutation(a, b)


def bench_ot(args: argparse.Namespace) -> list[dict[str, Any]]:
    x = checkerboard_model_units(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    solvers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "emd (POT, whole batch)": lambda a, b: assignment(a, b, "emd"),
        "lsa (scipy, whole batch)": lambda a, b: assignment(a, b, "lsa"),
        "lsa, random chunks of 128": lambda a, b: chunked_assignment(a, b, 128, "lsa"),
        "lsa, random chunks of 64": lambda a, b: chunked_assignment(a, b, 64, "lsa"),
        "auto (iterflow default)": lambda a, b: ot_permutation(a, b),
        "auto, NumPy pairing (without numba)": numpy_auto,
        "auto with 24 refinement passes": lambda a, b: ot_permutation(a, b, refine=24),
        "sinkhorn (POT, reg 0.05, sampled)": lambda a, b: sinkhorn_pairing(a, b, 0.05, g),
    }
    rows = []
    for n in args.ot_sizes:
        problems = ot_batches(x, args.ot_reps, n, g)
        exact = [transport_cost(a, b[assignment(a, b, "emd")]) for a, b in problems]
        for name, solve in solvers.items():
            if name.startswith("lsa (") and n > 2048:
                continue  # minutes per batch
            times, ratios = [], []
            solve(*problems[0])  # warm-up: imports, caches
            for (a, b), c in zip(problems, exact):
                t = time.perf_counter()
                perm = solve(a, b)
                times.append(time.perf_counter() - t)
                ratios.append(transport_cost(a, b[perm]) / c)
            rows.append(
                {
                    "batch": n,
                    "solver": name,
                    "ms": 1e3 * statistics.median(times),
                    "cost_vs_exact": float(np.mean(ratios)),
                    "independent_cost_vs_exact": float(
                        np.mean([transport_cost(a, b) / c for (a, b), c in zip(problems, exact)])
                    ),
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------
# Sampling and likelihood
# ------------------------------------------------------------------------------------------------


def _rate(fn: Callable[[], Any], count: int, device: torch.device, reps: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return count / best


def bench_inference(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(args.seed)
    flow = Flow([Block(MLPVelocity(2, HIDDEN, time_freqs=0))], (2,)).to(device).eval()
    n, m = args.n_sample, args.n_nll
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(m, 2, device=device, generator=g)
    rows = []

    def sample() -> Tensor:
        with torch.no_grad():
            return flow.sample(n, generator=g, solver="euler", steps=32)

    rows.append(
        {"task": "sample, Euler NFE 32", "unit": "samples/s", "rate": _rate(sample, n, device)}
    )
    if device.type == "cpu" and cpu_has_native_bf16():

        def sample_bf16() -> Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return sample()

        rows.append(
            {
                "task": "sample, Euler NFE 32, bf16 autocast (velocity only)",
                "unit": "samples/s",
                "rate": _rate(sample_bf16, n, device),
            }
        )
    try:
        from flow_matching.solver import ODESolver

        class Wrapped(nn.Module):
            def __init__(self, net: nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: Tensor, t: Tensor) -> Tensor:
                return self.net(x, t)

        solver = ODESolver(velocity_model=Wrapped(flow.blocks[0].velocity))
        z = torch.randn(n, 2, device=device, generator=g)
        grid = torch.tensor([1.0, 0.0], device=device)
        rows.append(
            {
                "task": "sample, Euler NFE 32 (flow_matching ODESolver, same network)",
                "unit": "samples/s",
                "rate": _rate(
                    lambda: solver.sample(z, step_size=1 / 32, method="euler", time_grid=grid),
                    n,
                    device,
                ),
            }
        )
    except ImportError:
        pass
    for div, probes in (("exact", 1), ("hutchinson", 1), ("hutchinson", 4)):
        label = f"log_prob, {div}" + (f" ({probes} probe(s))" if div == "hutchinson" else "")
        rows.append(
            {
                "task": label + ", RK4 8 steps (NFE 32)",
                "unit": "points/s",
                "rate": _rate(
                    lambda div=div, probes=probes: flow.log_prob(
                        x, divergence=div, probes=probes, generator=g, solver="rk4", steps=8
                    ).detach(),
                    m,
                    device,
                ),
            }
        )
    rows += bench_divergence(flow.blocks[0].velocity, x, device)
    return rows


def bench_divergence(net: nn.Module, x: Tensor, device: torch.device) -> list[dict[str, Any]]:
    """Cost of one exact divergence of the velocity at ``len(x)`` points, by several methods."""
    from torch.func import jacfwd, jacrev, vmap

    t = torch.tensor(0.5, device=device)

    def batched() -> Tensor:
        xs = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return divergence_exact(net(xs, t), xs, create_graph=False, batched=True)

    def loop() -> Tensor:
        xs = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = net(xs, t)
            return sum(
                torch.autograd.grad(v[:, i].sum(), xs, retain_graph=True)[0][:, i]
                for i in range(x.shape[1])
            )

    def single(xi: Tensor) -> Tensor:
        return net(xi[None], t)[0]

    def func_rev() -> Tensor:
        return vmap(jacrev(single))(x).diagonal(dim1=1, dim2=2).sum(-1)

    def func_fwd() -> Tensor:
        return vmap(jacfwd(single))(x).diagonal(dim1=1, dim2=2).sum(-1)

    def one_pass() -> Tensor:
        with torch.no_grad():
            return net.velocity_and_jacobian_terms(x, t)[1]  # type: ignore[operator,index]

    def hutch() -> Tensor:
        xs = x.detach().requires_grad_(True)
        eps = torch.randint(0, 2, (1, *x.shape), device=device).to(x.dtype) * 2 - 1
        with torch.enable_grad():
            return divergence_hutchinson(net(xs, t), xs, eps, create_graph=False)

    ref = batched()
    rows = []
    for name, fn in (
        ("batched backward (iterflow.ode.divergence_exact)", batched),
        ("loop of d backward passes", loop),
        ("torch.func vmap(jacrev)", func_rev),
        ("torch.func vmap(jacfwd) (forward mode)", func_fwd),
        ("one pass, forward-mode tangents (MLPVelocity.velocity_and_jacobian_terms)", one_pass),
        ("Hutchinson, 1 probe (estimate)", hutch),
    ):
        try:
            out = fn()
        except RuntimeError as e:  # an op without a vmap rule
            rows.append({"task": f"divergence: {name}", "unit": "error", "rate": str(e)[:60]})
            continue
        agree = float((out - ref).detach().abs().max()) if "Hutchinson" not in name else None
        rows.append(
            {
                "task": f"divergence + velocity: {name}",
                "unit": "points/s",
                "rate": _rate(fn, len(x), device),
                "max_abs_diff_vs_batched": agree,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------
# Quality of the fast defaults
# ------------------------------------------------------------------------------------------------


def bench_quality(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The default recipe trained with ``autocast=none`` and ``auto``: test NLL and W2."""
    from iterflow.evaluation.evaluate import evaluate

    ds = get_dataset("checkerboard")
    rows = []
    for coupling in ("independent", "ot"):
        for autocast in ("none", "auto"):
            cfg = TrainConfig(
                data="checkerboard",
                steps=args.quality,
                seed=args.seed,
                device=str(device),
                autocast=autocast,
                options={"coupling": coupling},
            )
            with tempfile.TemporaryDirectory() as tmp:
                res = train(cfg, Path(tmp) / "run")
            m = evaluate(res.flow, res.splits.test, entropy=ds.entropy(), n=2000, seed=args.seed)
            rows.append(
                {
                    "coupling": coupling,
                    "autocast": f"{autocast} ({res.history[0]['autocast']})",
                    "steps_per_s": args.quality / res.history[0]["seconds_optimize"],
                    "nll": m["nll"],
                    "nll_stderr": m["nll_stderr"],
                    "w2": m["w2"],
                    "w2@8": m["w2_by_nfe"].get("8", m["w2_by_nfe"].get(8)),
                }
            )
    return rows


#: The preset ``make demo`` trains (the Makefile's ``DEMO_CONFIG``; a test keeps the two equal).
DEMO_PRESET = "checkerboard-fourier"


def demo_configs(
    args: argparse.Namespace, device: torch.device, changes: list[dict[str, Any]]
) -> list[tuple[Any, TrainConfig]]:
    """``make demo``'s configuration (``iterflow train --config DEMO_PRESET``, resolved by the CLI),
    then flow matching's recommended settings (``iterflow train`` without a config: ``{}``), then
    each of ``changes`` applied to those settings (``TrainConfig`` keyword arguments)."""
    from bench_anytime import preset_config

    demo = preset_config(DEMO_PRESET, "fm")
    demo = dataclasses.replace(demo, seed=args.seed, device=str(device))
    out: list[tuple[Any, TrainConfig]] = [(f"make demo (--config {DEMO_PRESET})", demo)]
    for v in [{}, *changes]:
        cfg = TrainConfig.for_method("fm", **{"seed": args.seed, "device": str(device), **v})
        out.append((v, cfg))
    return out


def bench_demo(
    args: argparse.Namespace, device: torch.device, variants: list[tuple[Any, TrainConfig]]
) -> list[dict[str, Any]]:
    """Quality per second: ``make demo``'s training and variants of it (``demo_configs``) at this
    run's threads: the training seconds and the test NLL (exact trace, 5,000 test points) against
    the entropy ``log 32`` of the checkerboard.

    The variants are trained ``--demo-repeats`` times in interleaved rounds; a seeded run of a fixed
    step count trains the same model every time (its NLL is evaluated once, from the last round), so
    its repeats only measure the seconds: their median is reported, with the minimum and maximum.
    A run with a time budget (the preset's ``time_budget``) takes as many steps as the machine
    fits, so each of its repeats is evaluated and the median gap is reported (with every run's
    steps, seconds and gap)."""
    from iterflow.evaluation.evaluate import evaluate

    ds = get_dataset("checkerboard")
    cfgs = [cfg for _, cfg in variants]
    if any(cfg.data != "checkerboard" for cfg in cfgs):
        raise ValueError("the demo's variants must train on the checkerboard")
    runs: list[list[dict[str, float]]] = [[] for _ in cfgs]
    for _ in range(args.demo_repeats):
        for i, cfg in enumerate(cfgs):
            with tempfile.TemporaryDirectory() as tmp:
                res = train(cfg, Path(tmp) / "run")
            run = {
                "seconds": sum(float(h["seconds_optimize"]) for h in res.history),
                "steps": sum(int(h["steps"]) for h in res.history),
            }
            last = len(runs[i]) == args.demo_repeats - 1
            if cfg.time_budget > 0 or last:
                m = evaluate(
                    res.flow, res.splits.test, entropy=ds.entropy(), n=5000, seed=args.seed
                )
                run.update(nll=m["nll"], nll_stderr=m["nll_stderr"], gap=m["nll"] - ds.entropy())
            runs[i].append(run)
    rows = []
    for (v, _), cfg, rs in zip(variants, cfgs, runs):
        secs = [r["seconds"] for r in rs]
        scored = [r for r in rs if "gap" in r]
        mid = sorted(scored, key=lambda r: r["gap"])[(len(scored) - 1) // 2]  # the median run
        rows.append(
            {
                "changes": v,
                "steps": cfg.steps,
                "time_budget": cfg.time_budget,
                "steps_runs": [r["steps"] for r in rs],
                "seconds_train": float(np.median(secs)),
                "seconds_min": min(secs),
                "seconds_max": max(secs),
                "seconds_runs": secs,
                "gap_runs": [r["gap"] for r in scored],
                "nll": mid["nll"],
                "nll_stderr": mid["nll_stderr"],
                "entropy": ds.entropy(),
                "gap": mid["gap"],
            }
        )
    return rows


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets next to what this run measured (rows only for sections that ran)."""
    rows: list[dict[str, Any]] = []

    def add(what: str, target: str, value: float | None, ok: bool | None) -> None:
        rows.append({"target": what, "wanted": target, "measured": value, "met": ok})

    like = result.get("likelihood", {}).get("eval", [])
    for r in like:
        if r.get("contender") in ("iterflow Flow.log_prob", "iterflow Flow.compiled().log_prob"):
            two_d = "(2-D)" in str(r.get("case", ""))
            want = 3.0 if two_d else 2.0
            ratio = float(r["vs_plain"])
            ok = ratio >= want and abs(float(r.get("nll_minus_plain", 0.0))) <= 1e-3
            how = ", compiled" if "compiled" in r["contender"] else ""
            add(f"likelihood {r['case']}{how} vs plain torchdiffeq", f">= {want:g}x", ratio, ok)
            if (
                "gemm_bound_vs_plain" in r and not how
            ):  # the roofline: reachable at this NFE only if above
                bound = float(r["gemm_bound_vs_plain"])
                add(f"  (at its NFE, the fp32 GEMM peak allows {bound:.2f}x)", f">= {want:g}x",
                    bound, bound >= want)  # fmt: skip
    for r in result.get("likelihood", {}).get("work_precision", {}).get("equal", []):
        want = 3.0 if "(2-D)" in str(r["case"]) else 2.0
        v = r["equal_accuracy_vs_plain"]
        diff = r.get("best_nll_minus_ref")
        allowed = nll_allowed(r.get("plain_1e-5_nll_minus_ref"))
        ok = v is not None and v >= want and diff is not None and abs(diff) <= allowed
        add(f"likelihood {r['case']} at equal accuracy ({r['best_setting']}) vs plain",
            f">= {want:g}x", v, ok)  # fmt: skip
    summary = result.get("summary", {})
    if summary:
        v = summary["iterflow_vs_fastest_library_independent"]
        add("training, defaults vs fastest library", ">= 1.5x", v, v >= 1.5)
        v = summary["iterflow_fp32_vs_fastest_library_independent"]
        add("training, fp32 vs fastest library", ">= 1.0x", v, v >= 1.0)
        for what, key, want in (
            ("defaults", "iterflow_vs_fastest_library_independent_paired", 1.5),
            ("fp32", "iterflow_fp32_vs_fastest_library_independent_paired", 1.0),
        ):
            if key in summary:  # results written before the per-round pairing have none
                lo, hi = summary[key + "_min"], summary[key + "_max"]
                add(f"  ({what}, paired per round: median; rounds {lo:.2f}-{hi:.2f}x)",
                    f">= {want:.1f}x", summary[key], summary[key] >= want)  # fmt: skip
        v = summary["iterflow_ot_auto_vs_own_independent"]
        add("training with minibatch OT vs independent pairs", ">= 0.8x", v, v >= 0.8)
        key = "iterflow_ot_auto_vs_own_independent_paired"
        if key in summary:
            lo, hi = summary[key + "_min"], summary[key + "_max"]
            add(f"  (paired per round: median; rounds {lo:.2f}-{hi:.2f}x)", ">= 0.8x",
                summary[key], summary[key] >= 0.8)  # fmt: skip
    for r in result.get("ot", []):
        if r["batch"] == 1024 and r["solver"].startswith("auto (iterflow"):
            v = float(r["cost_vs_exact"])
            add("OT pairing cost at batch 1024 vs exact", "<= 1.1x", v, v <= 1.1)
    for r in result.get("likelihood", {}).get("training", []):
        if r["path"] != "autograd":
            v = float(r["vs_autograd"])  # the autograd path: the step before issue 14
            add(f"{r['method']} training step ({r['path']}) vs before", ">= 2x", v, v >= 2.0)
    demo = result.get("demo")
    if demo:
        ok = demo["gap"] <= 0.15 and demo["seconds_train"] <= 35
        add("demo: NLL gap to log 32 (within 35 s of training)", "<= 0.15", demo["gap"], ok)
        add("demo: training seconds", "<= 35", demo["seconds_train"], demo["seconds_train"] <= 35)
    return rows


def likelihood_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Exact NLL against the plain torchdiffeq evaluator; CNF / JKO-flow optimiser steps/s
    (:mod:`speed_likelihood`). Threads and load average are recorded before and after."""
    out: dict[str, Any] = {"load_before": likelihood_load(), "bf16_rows": bf16_native(device)}
    if not out["bf16_rows"]:
        print("\n(bf16 rows left out: this CPU has no native bf16 arithmetic)")
    rows: list[dict[str, Any]] = []
    needs_cases = {"eval", "work-precision"} & set(args.like_parts)
    cases = likelihood_cases(args, device) if needs_cases else []
    if "eval" in args.like_parts:
        rows = bench_likelihood_eval(cases, args, device)
        print(
            f"\n## Exact NLL evaluation (dopri5, atol = rtol = 1e-5; {args.like_rounds} rounds)\n"
        )
        cols = ["case", "points", "contender", "points_per_s", "vs_plain", "nfe", "nll"]
        cols += [
            "nll_minus_plain",
            "max_abs_diff_vs_plain",
            "mean_abs_err_vs_ref",
            "max_abs_err_vs_ref",
            "gemm_bound_vs_plain",
        ]
        print(table(rows, cols))
    train_rows: list[dict[str, Any]] = []
    if "training" in args.like_parts:
        train_rows = bench_likelihood_training(args, device)
        print(f"\n## CNF / JKO-flow optimiser steps/s (rose recipes, {args.like_rounds} rounds)\n")
        cols = ["method", "data", "path", "steps_per_s", "min", "max", "vs_autograd"]
        print(table(train_rows, cols))
    if "work-precision" in args.like_parts:
        wp = bench_work_precision(cases, args, device)
        print(f"\n## Work-precision: exact NLL per setting ({args.like_rounds} rounds)\n")
        cols = ["case", "evaluator", "solver", "error_norm", "autocast", "tol", "nfe"]
        cols += ["points_per_s", "mean_abs_err", "max_abs_err", "nll_minus_ref"]
        cols += ["vs_plain_at_equal_accuracy"]
        print(table(wp["points"], cols))
        print("\n## Speed at equal accuracy (the plain evaluator interpolated on its curve)\n")
        cols = ["case", "same_tolerance_vs_plain", "best_setting", "best_nfe"]
        cols += ["best_mean_abs_err", "best_max_abs_err", "equal_accuracy_vs_plain"]
        cols += ["best_float32_vs_plain", "best_nll_minus_ref", "plain_1e-5_nll_minus_ref"]
        print(table(wp["equal"], cols))
        if args.wp_plot:
            plot_work_precision(wp["points"], args.wp_plot)
        out["work_precision"] = wp
    out["load_after"] = likelihood_load()
    print(f"\nthreads and load average: {out['load_before']} -> {out['load_after']}")
    out["eval"], out["training"] = rows, train_rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every contender")
    ap.add_argument("--steps", type=int, default=100, help="steps per round (fast contenders)")
    ap.add_argument("--ot-steps", type=int, default=8, help="steps per round with exact OT")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="time the training contenders in this process (default: each round of each in its own)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every contender")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ot-sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--ot-reps", type=int, default=5)
    ap.add_argument("--n-sample", type=int, default=20_000)
    ap.add_argument("--n-nll", type=int, default=4_096)
    ap.add_argument("--quality", type=int, default=0, help="steps of the quality runs (0: skip)")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["train", "ot", "inference", "likelihood", "demo"],
    )
    ap.add_argument("--like-steps", type=int, default=6000, help="2-D model: the demo's steps")
    ap.add_argument("--like-run", default=None, help="2-D model: load this run folder instead")
    ap.add_argument("--like-points", type=int, default=2000, help="2-D test points")
    ap.add_argument("--like-steps-hd", type=int, default=2000, help="10/30/64-D models' steps")
    ap.add_argument("--like-points-hd", type=int, default=500, help="10/30/64-D points")
    ap.add_argument("--like-max-dim", type=int, default=64, help="skip the cases above this")
    ap.add_argument("--like-rounds", type=int, default=3, help="interleaved likelihood rounds")
    ap.add_argument("--like-train-steps", type=int, default=5, help="CNF/JKO steps per round")
    ap.add_argument(
        "--like-parts",
        nargs="+",
        default=["eval", "training"],
        choices=["eval", "training", "work-precision"],
        help="likelihood section: exact-NLL evaluation at one tolerance, CNF/JKO-flow optimiser "
        "steps, and (not by default) the work-precision comparison at equal accuracy",
    )
    ap.add_argument(
        "--wp-plot", default=None, help="likelihood work-precision part: write its figure here"
    )
    ap.add_argument("--img2d-dir", default=None, help="folder of the rose (CNF/JKO recipes)")
    ap.add_argument(
        "--demo-change",
        action="append",
        default=[],
        metavar="JSON",
        help="demo variant: TrainConfig settings, e.g. '{\"lr\": 0.004}' (repeatable)",
    )
    ap.add_argument(
        "--demo-repeats", type=int, default=3, help="interleaved demo trainings (median seconds)"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the training ratios of these result files and their medians, run nothing",
    )
    args = ap.parse_args()
    if args.combine:
        runs, medians = combine_runs(args.combine)
        print(table(runs, ["run", *SUMMARY_KEYS]))
        print(f"\nmedians over {len(runs)} runs: "
              + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))  # fmt: skip
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine()
    info["native_bf16"] = cpu_has_native_bf16()
    print("machine:", info)
    peak = {
        "float32": gemm_peak(torch.float32, device),
        "bfloat16": gemm_peak(torch.bfloat16, device),
    }
    print(
        f"\nGEMM peak (large square matmul): fp32 {peak['float32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s; one training step = "
        f"{step_flops() / 1e6:.1f} MFLOP of matrix products"
    )
    result: dict[str, Any] = {
        "machine": info,
        "gemm_peak_flops": peak,
        "step_flops": step_flops(),
        "load_before": likelihood_load(),
    }
    if "train" not in args.skip:
        rows = bench_training(args, device)
        for r in rows:
            bf16 = r["contender"].startswith("iterflow") and "none" not in r["contender"]
            bf16 = bf16 and info["native_bf16"] and device.type == "cpu"
            r["precision"] = "bf16 autocast" if bf16 else "fp32"
            r["peak_fraction"] = r["gflop_per_s"] * 1e9 / peak["bfloat16" if bf16 else "float32"]
        libs = [r for r in rows if r["library"] != "iterflow" and r["coupling"] == "independent"]
        # the libraries as their documentation runs them; the allocator-tuned loop apart
        best_lib = max(r["steps_per_s"] for r in libs if "allocator" not in r["library"])
        ours = {r["contender"]: r["steps_per_s"] for r in rows}
        summary = {
            "iterflow_vs_fastest_library_independent": ours["iterflow (defaults)"] / best_lib,
            "iterflow_fp32_vs_fastest_library_independent": ours["iterflow autocast=none"]
            / best_lib,
            "iterflow_ot_auto_vs_own_independent": ours["iterflow ot (auto)"]
            / ours["iterflow (defaults)"],
        }
        if "iterflow ot (auto, NumPy pairing)" in ours:
            summary["iterflow_ot_numpy_pairing_vs_own_independent"] = (
                ours["iterflow ot (auto, NumPy pairing)"] / ours["iterflow (defaults)"]
            )
        plain = [r["rates"] for r in libs if "allocator" not in r["library"]]
        rates = {r["contender"]: r["rates"] for r in rows}
        for key, contender in (
            ("iterflow_vs_fastest_library_independent_paired", "iterflow (defaults)"),
            ("iterflow_fp32_vs_fastest_library_independent_paired", "iterflow autocast=none"),
        ):
            paired = paired_ratio(rates[contender], plain)
            summary[key] = paired["median"]
            summary[key + "_min"], summary[key + "_max"] = paired["min"], paired["max"]
        if "iterflow ot (auto)" in rates:  # OT against its own independent step, round by round
            paired = paired_ratio(rates["iterflow ot (auto)"], [rates["iterflow (defaults)"]])
            key = "iterflow_ot_auto_vs_own_independent_paired"
            summary[key], summary[key + "_min"], summary[key + "_max"] = (
                paired["median"], paired["min"], paired["max"]
            )  # fmt: skip
        tuned = [r["steps_per_s"] for r in libs if "allocator" in r["library"]]
        if tuned:
            summary["iterflow_fp32_vs_allocator_tuned_library"] = (
                ours["iterflow autocast=none"] / tuned[0]
            )
        print(
            f"\n## Training steps/s (batch {BATCH}, median of {args.rounds} interleaved rounds)\n"
        )
        print(
            table(
                rows,
                [
                    "contender",
                    "coupling",
                    "precision",
                    "steps_per_s",
                    "min",
                    "max",
                    "gflop_per_s",
                    "peak_fraction",
                ],
            )
        )
        print("\n" + "\n".join(f"- {k}: {v:.2f}" for k, v in summary.items()))
        result["training"], result["summary"] = rows, summary
    if "ot" not in args.skip:
        rows = bench_ot(args)
        print("\n## Minibatch OT couplings (checkerboard data vs Gaussian noise, one thread)\n")
        print(table(rows, ["batch", "solver", "ms", "cost_vs_exact", "independent_cost_vs_exact"]))
        result["ot"] = rows
    if "inference" not in args.skip:
        rows = bench_inference(args, device)
        print("\n## Sampling and likelihood (same network, float32)\n")
        print(table(rows, ["task", "unit", "rate", "max_abs_diff_vs_batched"]))
        result["inference"] = rows
    if "likelihood" not in args.skip:
        result["likelihood"] = likelihood_section(args, device)
    if args.quality:
        rows = bench_quality(args, device)
        print(f"\n## Quality of the defaults ({args.quality} steps, default recipe)\n")
        print(
            table(rows, ["coupling", "autocast", "steps_per_s", "nll", "nll_stderr", "w2", "w2@8"])
        )
        result["quality"] = rows
    if "demo" not in args.skip:
        changes = [json.loads(c) for c in args.demo_change]
        rows = bench_demo(args, device, demo_configs(args, device, changes))
        result["demo"], result["demo_variants"] = rows[0], rows[1:]
        print(
            f"\n## Quality per second: the demo's training (median of {args.demo_repeats} "
            "interleaved runs)\n"
        )
        print(
            table(
                rows,
                ["changes", "steps", "time_budget", "steps_runs", "seconds_train", "seconds_min"]
                + ["seconds_max", "nll", "nll_stderr", "gap", "gap_runs"],
            )
        )
    result["load_after"] = likelihood_load()
    result["targets"] = targets(result)
    print(f"\n## Issue 14's targets ({args.threads} thread(s); load {result['load_after']})\n")
    print(table(result["targets"], ["target", "wanted", "measured", "met"]))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
