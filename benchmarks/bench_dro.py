"""Worst-case sampling benchmark: flow map (FlowDRO) against per-sample gradient ascent.

For each labelled data set (two moons, scikit-learn's 8x8 digits) a small MLP classifier is trained;
its cross-entropy is the risk. For each ``gamma`` the script

1. trains the flow map ``F`` maximising ``E R(F(X)) - E|X - F(X)|^2 / (2 gamma)`` on the training points
   with the library's defaults: the map is conditioned on the label (``DROConfig.condition="auto"``:
   a class embedding in each velocity MLP, so ``F(x, c)``; held-out points are moved with their own
   labels, which the baseline's transfer and the accuracy use too) and ``gamma`` is warmed up
   geometrically from ``gamma / 16`` over the first 60% of the steps (``gamma_warmup``); digits also
   use weight decay 1e-3 (it steadies the small-``gamma`` map on held-out points in 64-d);
2. calibrates the gradient-ascent baseline (``R(x') - |x - x'|^2 / (2 gamma_b)``, 100 steps with the
   per-sample step control of :func:`iterflow.apps.dro.gradient_ascent`) so that its transport cost on
   the training points equals the flow's (bisection on ``gamma_b``);
3. measures, on training points and on held-out points: transport cost ``E|X - F(X)|^2``, mean risk
   before/after, the Lagrangian objective at the flow's ``gamma``, accuracy before/after. Held-out
   points are moved by the flow directly, by the baseline's per-sample displacement of the nearest
   training point ("transfer": the generalising re-use of the per-sample steps), and by re-running
   the baseline on them ("re-opt.", an oracle that costs 100 risk gradients per new sample);
4. ablation (skip with ``--no-ablation``): the flow refitted without the label conditioning
   (``condition="none"``), without the warm-up (``gamma_warmup=0``) and without both (the map of
   ``x`` alone at fixed ``gamma``, this library's earlier recipe); training and held-out objectives.

Prints Markdown tables and the machine; ``--out FILE.json`` also writes the results (and ``FILE.md``).
About 5-6 minutes of wall time on 2 shared CPU cores, one thread (``--quick``: a smoke run).

    OMP_NUM_THREADS=1 python benchmarks/bench_dro.py --out benchmarks/results/dro.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_json  # noqa: E402

from iterflow.apps.dro import (
    ClassifierLoss,
    DROConfig,
    accuracy,
    assess,
    calibrate_ascent,
    fit_worst_case,
    gradient_ascent,
    labelled_data,
    train_classifier,
    transfer_displacement,
)

SETTINGS: dict[str, dict[str, Any]] = {
    "moons": {
        "gammas": [0.05, 0.1, 0.2, 0.5],
        "n_train": 1000,
        "n_test": 1000,
        "classifier": (64, 64),
        "flow": {
            "hidden": (64, 64),
            "ode_steps": 4,
            "steps": 800,
            "lr": 1e-2,
            "condition": "auto",
            "gamma_warmup": 0.6,
        },
    },
    "sklearn:digits": {
        "gammas": [0.3, 1.0, 3.0],
        "n_train": 1437,
        "n_test": 360,
        "classifier": (128,),
        "flow": {
            "hidden": (128, 128),
            "ode_steps": 4,
            "steps": 1500,
            "lr": 1e-2,
            "weight_decay": 1e-3,
            "condition": "auto",
            "gamma_warmup": 0.6,
        },
    },
}
ASCENT_STEPS = 100
# (name, overrides of the flow settings) refitted by the ablation
ABLATION = [
    ("x only, fixed gamma", {"condition": "none", "gamma_warmup": 0.0}),
    ("conditioned, fixed gamma", {"gamma_warmup": 0.0}),
    ("x only, warm-up", {"condition": "none"}),
]


def run_ablation(
    data: Any, risk: ClassifierLoss, gamma: float, flow_kw: dict[str, Any], seed: int
) -> list[dict[str, Any]]:
    """Training and held-out objectives of the flow without conditioning and/or the warm-up."""
    out = []
    for name, over in ABLATION:
        t0 = time.perf_counter()
        cfg = DROConfig(gamma=gamma, seed=seed, **{**flow_kw, **over})
        res = fit_worst_case(data.train_x, risk, labels=data.train_y, config=cfg)
        with torch.no_grad():
            y = res.map(data.test_x, labels=data.test_y)
        held = assess(data.test_x, y, risk, data.test_y, gamma)
        out.append(
            {
                "variant": name,
                "overrides": over,
                "conditioned": res.map.num_classes > 0,
                "train": res.train.to_json(),
                "held_out": held.to_json(),
                "seconds": time.perf_counter() - t0,
            }
        )
    return out


def run_gamma(
    data: Any, risk: ClassifierLoss, gamma: float, flow_kw: dict[str, Any], seed: int
) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = fit_worst_case(
        data.train_x, risk, labels=data.train_y, config=DROConfig(gamma=gamma, seed=seed, **flow_kw)
    )
    t_flow = time.perf_counter() - t0
    with torch.no_grad():
        y_test = res.map(data.test_x, labels=data.test_y)
    t0 = time.perf_counter()
    asc = calibrate_ascent(
        data.train_x,
        risk,
        res.train.transport_cost,
        labels=data.train_y,
        steps=ASCENT_STEPS,
        gamma0=gamma,
    )
    t_asc = time.perf_counter() - t0
    moved = transfer_displacement(data.train_x, asc.points, data.test_x)
    reopt = gradient_ascent(
        data.test_x, risk, gamma=asc.gamma, labels=data.test_y, steps=ASCENT_STEPS
    )
    te = (data.test_x, data.test_y)
    rows = {
        ("flow", "train"): res.train,
        ("flow", "held-out"): assess(*te[:1], y_test, risk, te[1], gamma),
        ("ascent", "train"): assess(data.train_x, asc.points, risk, data.train_y, gamma),
        ("ascent", "held-out transfer"): assess(te[0], moved, risk, te[1], gamma),
        ("ascent", "held-out re-opt."): assess(te[0], reopt.points, risk, te[1], gamma),
    }
    return {
        "gamma": gamma,
        "gamma_ascent": asc.gamma,
        "seconds_flow": t_flow,
        "seconds_calibration": t_asc,
        "rows": [{"method": m, "split": s, **a.to_json()} for (m, s), a in rows.items()],
    }


def run_data(name: str, quick: bool, seed: int, ablation: bool) -> dict[str, Any]:
    s = SETTINGS[name]
    flow_kw = dict(s["flow"])
    gammas = s["gammas"]
    if quick:
        flow_kw["steps"] = 150
        gammas = gammas[1:3]
    data = labelled_data(name, s["n_train"], s["n_test"], seed)
    t0 = time.perf_counter()
    clf = train_classifier(
        data.train_x, data.train_y, hidden=s["classifier"], steps=1500, seed=seed
    )
    out = {
        "data": name,
        "n_train": int(data.train_x.shape[0]),
        "n_test": int(data.test_x.shape[0]),
        "classifier": {
            "hidden": list(s["classifier"]),
            "steps": 1500,
            "label_smoothing": 0.1,
            "train_accuracy": accuracy(clf, data.train_x, data.train_y),
            "test_accuracy": accuracy(clf, data.test_x, data.test_y),
            "seconds": time.perf_counter() - t0,
        },
        "flow": {k: list(v) if isinstance(v, tuple) else v for k, v in flow_kw.items()},
        "ascent_steps": ASCENT_STEPS,
        "results": [],
    }
    risk = ClassifierLoss(clf)
    for g in gammas:
        out["results"].append(run_gamma(data, risk, g, flow_kw, seed))
        r = out["results"][-1]
        if ablation:
            r["ablation"] = run_ablation(data, risk, g, flow_kw, seed)
        print(
            f"  {name} gamma={g}: flow {r['seconds_flow']:.1f} s, "
            f"calibration {r['seconds_calibration']:.1f} s"
            + (f", ablation {sum(a['seconds'] for a in r['ablation']):.1f} s" if ablation else ""),
            flush=True,
        )
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = (
        "| data | gamma | method | points | cost E\\|X-F(X)\\|^2 | risk before | risk after | risk increase "
        "| accuracy before | accuracy after |"
    )
    lines = [head, "|" + "---|" * 10]
    for d in results:
        for r in d["results"]:
            for row in r["rows"]:
                g = (
                    f"{r['gamma']:g}"
                    if row["method"] == "flow"
                    else f"{r['gamma']:g} (ascent {r['gamma_ascent']:.3g})"
                )
                lines.append(
                    f"| {d['data']} | {g} | {row['method']} | {row['split']} | {row['transport_cost']:.4g} "
                    f"| {row['risk_before']:.4g} | {row['risk_after']:.4g} | {row['risk_increase']:.4g} "
                    f"| {row['accuracy_before']:.3f} | {row['accuracy_after']:.3f} |"
                )
    return "\n".join(lines)


def transfer_table(results: list[dict[str, Any]]) -> str:
    """Held-out points: the flow against the baseline's re-used (nearest-point) steps.

    Costs differ on held-out points, so the Lagrangian objective ``E R(F X) - E|X - F X|^2 / (2 gamma)``
    at the flow's ``gamma`` is the figure that weighs risk against cost; "kept" is the held-out risk
    increase over the training one (1 = the attack transfers fully).
    """
    lines = [
        "| data | gamma | flow cost | transfer cost | flow risk increase | transfer risk increase "
        "| flow objective | transfer objective | flow kept | transfer kept | flow accuracy "
        "| transfer accuracy | re-opt. risk increase (oracle) |",
        "|" + "---|" * 13,
    ]
    for d in results:
        for r in d["results"]:
            by = {(row["method"], row["split"]): row for row in r["rows"]}
            ft, fh = by[("flow", "train")], by[("flow", "held-out")]
            at, ah = by[("ascent", "train")], by[("ascent", "held-out transfer")]
            ao = by[("ascent", "held-out re-opt.")]
            lines.append(
                f"| {d['data']} | {r['gamma']:g} | {fh['transport_cost']:.4g} "
                f"| {ah['transport_cost']:.4g} | {fh['risk_increase']:.4g} | {ah['risk_increase']:.4g} "
                f"| {fh['objective']:.4g} | {ah['objective']:.4g} "
                f"| {fh['risk_increase'] / ft['risk_increase']:.3f} "
                f"| {ah['risk_increase'] / at['risk_increase']:.3f} | {fh['accuracy_after']:.3f} "
                f"| {ah['accuracy_after']:.3f} | {ao['risk_increase']:.4g} |"
            )
    return "\n".join(lines)


def ablation_table(results: list[dict[str, Any]]) -> str:
    """Objective (at ``gamma``) of each flow variant on training / held-out points, beside the
    baseline (cost-matched to the default flow: ascent on training points, transfer on held-out)."""
    names = [n for n, _ in ABLATION] + ["conditioned, warm-up (default)"]
    head = "| data | gamma | " + " | ".join(names) + " | ascent / transfer |"
    lines = [
        "Objective E R(F X) - E|X - F X|^2 / (2 gamma), training / held-out points:",
        "",
        head,
        "|" + "---|" * (len(names) + 3),
    ]
    any_rows = False
    for d in results:
        for r in d["results"]:
            if "ablation" not in r:
                continue
            any_rows = True
            by = {(row["method"], row["split"]): row for row in r["rows"]}
            cells = [
                f"{a['train']['objective']:.4g} / {a['held_out']['objective']:.4g}"
                for a in r["ablation"]
            ]
            cells.append(
                f"**{by[('flow', 'train')]['objective']:.4g} / "
                f"{by[('flow', 'held-out')]['objective']:.4g}**"
            )
            cells.append(
                f"{by[('ascent', 'train')]['objective']:.4g} / "
                f"{by[('ascent', 'held-out transfer')]['objective']:.4g}"
            )
            lines.append(f"| {d['data']} | {r['gamma']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if any_rows else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default="moons,sklearn:digits", help="comma-separated: moons, sklearn:digits"
    )
    ap.add_argument("--quick", action="store_true", help="two gammas, 150 flow steps (a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-ablation", action="store_true", help="skip the refits without conditioning/warm-up"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = [
        run_data(name, args.quick, args.seed, not args.no_ablation) for name in args.data.split(",")
    ]
    total = time.perf_counter() - t0
    report = markdown(results, total)
    print("\n" + report)
    if args.out:
        write_json(
            args.out,
            {
                "machine": machine(),
                "seconds": total,
                "seed": args.seed,
                "quick": args.quick,
                "results": results,
            },
        )
        Path(args.out).with_suffix(".md").write_text(report + "\n")
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")


def markdown(results: list[dict[str, Any]], total: float) -> str:
    """The whole report: machine, settings, the full table and the held-out comparison."""
    lines = [f"machine: {machine()}; total wall time {total:.0f} s", ""]
    for d in results:
        c = d["classifier"]
        lines.append(
            f"- {d['data']}: {d['n_train']} training / {d['n_test']} held-out points; classifier "
            f"accuracy train {c['train_accuracy']:.3f}, held-out {c['test_accuracy']:.3f}; flow "
            f"{d['flow']}; baseline {d['ascent_steps']} adaptive gradient-ascent steps, "
            "cost-matched to the flow on the training points"
        )
    lines += [
        "",
        table(results),
        "",
        "Held-out points: the flow map vs the baseline's nearest-training-point steps "
        "(objective at the flow's gamma; kept = held-out / training risk increase):",
        "",
        transfer_table(results),
    ]
    abl = ablation_table(results)
    if abl:
        lines += [
            "",
            "Ablation of the flow map (same data, classifier, seed and settings):",
            "",
            abl,
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
