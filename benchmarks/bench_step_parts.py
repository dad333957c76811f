"""Parts of a training step that are not the network's arithmetic, each against its alternative.

Issue 14 asks to "profile and remove what is not arithmetic" from the training step. This times,
side by side in one process (interleaved rounds, medians of ``--rounds``), the pieces the
seventeenth session changed:

1. The first layer's weight gradient: with few input columns ``k`` and ``H`` outputs, autograd
   formed it as ``(g^T a)^T``, an ``(H, B) x (B, k)`` product (the weight used transposed), where
   ``MLPVelocity.first_layer`` now has it formed as ``a^T g``, a ``(k, B) x (B, H)`` product.
2. Drawing a minibatch's rows: ``data[idx]`` against ``torch.index_select(data, 0, idx)``.
3. The optimiser step of the demo's network (3 x 256 MLP): ``opt.step()`` of the fused Adam,
   :class:`iterflow.train.loop.AdamStep`, and the fused kernel with the step counters alone.
4. The transport application's classifiers (twentieth session), whose input layers now run
   through :func:`iterflow.core.nn.stacked_linear` (the weight gradient of item 1, and with a time
   per row one product instead of two and a sum): a forward and backward pass of the transport
   fit's KL classifier (``LogitNet``) and of the telescopic ratio's time-conditioned one, against
   the same modules' ``nn.Linear`` layers applied in turn (as before). The last row times the same
   change on the DRO classifier (its first layer through ``stacked_linear``, the rest of its
   ``nn.Sequential`` after it), which measured slower and keeps its ``nn.Linear`` layers.

Usage (the machine otherwise idle)::

    OMP_NUM_THREADS=2 python benchmarks/bench_step_parts.py --threads 2 \\
        --out benchmarks/results/step_parts_t2.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table, write_json  # noqa: E402

from iterflow import flush_denormals  # noqa: E402
from iterflow.core.nn import MLPVelocity  # noqa: E402
from iterflow.train.loop import AdamStep, make_optimizer  # noqa: E402


def timed(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    """Median µs per call of each function, the functions interleaved in every round."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append(1e6 * (time.perf_counter() - t0) / calls)
    return {name: statistics.median(v) for name, v in times.items()}


def weight_gradients(rounds: int, calls: int) -> list[dict[str, Any]]:
    rows = []
    for b, h, k in [
        (1024, 256, 3),
        (1024, 256, 12),
        (1024, 256, 35),
        (256, 128, 3),
        (4096, 512, 3),
    ]:
        g, a = torch.randn(b, h), torch.randn(b, k)
        t = timed(
            {
                "(H,B)x(B,k)": lambda g=g, a=a: torch.mm(g.t(), a),
                "(k,B)x(B,H)": lambda g=g, a=a: torch.mm(a.t(), g),
            },
            rounds,
            calls,
        )
        rows.append(
            {"B": b, "H": h, "k": k, "before_us": t["(H,B)x(B,k)"], "now_us": t["(k,B)x(B,H)"],
             "speed_up": t["(H,B)x(B,k)"] / t["(k,B)x(B,H)"]}
        )  # fmt: skip
    return rows


def row_draws(rounds: int, calls: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, batch in [((100_000, 2), 1024), ((20_000, 3, 32, 32), 128)]:
        data = torch.randn(shape, generator=gen)
        idx = torch.randint(0, shape[0], (batch,), generator=gen)
        assert torch.equal(data[idx], torch.index_select(data, 0, idx))
        t = timed(
            {
                "index": lambda d=data, i=idx: d[i],
                "index_select": lambda d=data, i=idx: torch.index_select(d, 0, i),
            },
            rounds,
            calls,
        )
        rows.append(
            {"data": str(shape), "rows": batch, "before_us": t["index"],
             "now_us": t["index_select"], "speed_up": t["index"] / t["index_select"]}
        )  # fmt: skip
    return rows


def optimiser_steps(rounds: int, calls: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net = MLPVelocity(2, (256, 256, 256), time_freqs=4)
    params = list(net.parameters())
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    opt = make_optimizer([{"params": params}], 1e-3, 0.0)
    opt.step()  # creates the state
    step = AdamStep(opt)
    state = [opt.state[p] for p in params]
    lists = [[s[key] for s in state] for key in ("exp_avg", "exp_avg_sq", "step")]
    grads = [p.grad for p in params]

    def kernel() -> None:
        torch._foreach_add_(lists[2], 1)
        torch._fused_adam_(
            params, grads, lists[0], lists[1], [], lists[2], lr=1e-3, beta1=0.9, beta2=0.999,
            weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip

    t = timed({"opt.step()": opt.step, "AdamStep": step, "kernel": kernel}, rounds, calls)
    return [{"tensors": len(params), "opt_step_us": t["opt.step()"], "adam_step_us": t["AdamStep"],
             "kernel_and_counters_us": t["kernel"]}]  # fmt: skip


def classifier_steps(rounds: int, calls: int) -> list[dict[str, Any]]:
    from iterflow.apps.dro.classifier import MLPClassifier
    from iterflow.apps.ot.classifiers import LogitNet
    from iterflow.core.nn import stacked_linear

    torch.manual_seed(0)
    cases: list[tuple[str, torch.nn.Module, int, Callable[..., Any], Callable[..., Any]]] = []
    logit = LogitNet(2, (64, 64))
    cases.append(("transport KL classifier, 2-D, (64, 64)", logit, 2048, logit,
                  lambda u: logit.body(logit.inp(u)).squeeze(-1)))  # fmt: skip
    timed_net = LogitNet(2, (64, 64), time_conditioned=True, time_freqs=4)

    def per_row(u: torch.Tensor) -> torch.Tensor:
        return timed_net(u, torch.linspace(0, 1, u.shape[0]))

    def per_row_before(u: torch.Tensor) -> torch.Tensor:
        tf = timed_net.time(torch.linspace(0, 1, u.shape[0])[:, None])
        return timed_net.body(timed_net.inp(u) + timed_net.inp_t(tf)).squeeze(-1)

    cases.append(("telescopic ratio classifier, 2-D, time per row", timed_net, 1024, per_row,
                  per_row_before))  # fmt: skip
    dro = MLPClassifier(2, 2, (64, 64))
    first, rest = dro.net[0], dro.net[1:]

    def dro_stacked(u: torch.Tensor) -> torch.Tensor:
        return rest(stacked_linear([u], [first.weight], first.bias))

    cases.append(("DRO classifier, 2-D, 2 classes, (64, 64) (not adopted)", dro, 256,
                  dro_stacked, dro.net))  # fmt: skip
    rows = []
    for name, net, batch, now, before in cases:
        u = torch.randn(batch, 2)
        params = list(net.parameters())
        assert torch.allclose(now(u), before(u), rtol=1e-5, atol=1e-5)

        def step(f: Callable[..., Any], u: torch.Tensor = u, params: list = params) -> None:
            torch.autograd.grad(f(u).square().sum(), params)

        t = timed({"before": lambda s=step, f=before: s(f), "now": lambda s=step, f=now: s(f)},
                  rounds, calls)  # fmt: skip
        rows.append({"classifier": name, "rows": batch, "before_us": t["before"],
                     "now_us": t["now"], "speed_up": t["before"] / t["now"]})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=200, help="calls per function and round")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    flush_denormals()
    torch.set_num_threads(args.threads)
    info = {**machine(), "rounds": args.rounds, "calls": args.calls, "load": os.getloadavg()}
    print(f"machine: {info}\n")
    result: dict[str, Any] = {"machine": info}
    sections = [
        ("weight_gradient", "First layer's weight gradient (µs)", weight_gradients),
        ("row_draw", "Drawing a minibatch's rows (µs)", row_draws),
        ("optimiser_step", "Optimiser step of the 3 x 256 MLP (µs)", optimiser_steps),
        ("classifier_step", "Forward and backward of the apps' classifiers (µs)", classifier_steps),
    ]
    for key, title, fn in sections:
        rows = fn(args.rounds, args.calls)
        result[key] = rows
        print(f"## {title}\n\n{table(rows, list(rows[0]))}\n")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
