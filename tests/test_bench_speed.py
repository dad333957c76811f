"""``benchmarks/bench_speed.py``'s pure pieces: the per-round paired ratio and the targets table."""

from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str) -> ModuleType:
    """A module of ``benchmarks/`` (imported as the scripts import each other)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _bench_module("bench_speed")


@pytest.mark.parametrize("rounds", [1, 5, 9])
def test_paired_ratio_cancels_a_drifting_machine(bench: ModuleType, rounds: int) -> None:
    """Every contender of a round slowed by the same factor: the paired ratio is exact whatever
    the drift, against the fastest peer of each round (which may change from round to round)."""
    g = torch.Generator().manual_seed(rounds)
    drift = (0.5 + torch.rand(rounds, generator=g, dtype=torch.float64)).tolist()
    peer_a = (100 + 10 * torch.rand(rounds, generator=g, dtype=torch.float64)).tolist()
    peer_b = (100 + 10 * torch.rand(rounds, generator=g, dtype=torch.float64)).tolist()
    speed = 1.37
    ours = [speed * max(a, b) * k for a, b, k in zip(peer_a, peer_b, drift, strict=True)]
    peers = [[a * k for a, k in zip(p, drift, strict=True)] for p in (peer_a, peer_b)]
    out = bench.paired_ratio(ours, peers)
    assert out["median"] == pytest.approx(speed, rel=1e-12)
    assert out["min"] == pytest.approx(speed, rel=1e-12)
    assert out["max"] == pytest.approx(speed, rel=1e-12)


def test_paired_ratio_is_the_median_of_the_rounds(bench: ModuleType) -> None:
    ours, peer = [2.0, 3.0, 10.0], [1.0, 2.0, 2.0]
    out = bench.paired_ratio(ours, [peer, [0.5, 0.5, 0.5]])
    assert out == {"median": statistics.median([2.0, 1.5, 5.0]), "min": 1.5, "max": 5.0}


@pytest.mark.parametrize(("ours", "peers"), [([1.0, 2.0], [[1.0]]), ([1.0], []), ([], [[]])])
def test_paired_ratio_rejects_unpaired_rounds(
    bench: ModuleType, ours: list[float], peers: list[list[float]]
) -> None:
    with pytest.raises(ValueError, match="one rate per round"):
        bench.paired_ratio(ours, peers)


def test_targets_list_the_paired_ratios_when_the_run_has_them(bench: ModuleType) -> None:
    summary = {
        "iterflow_vs_fastest_library_independent": 1.3,
        "iterflow_fp32_vs_fastest_library_independent": 0.97,
        "iterflow_ot_auto_vs_own_independent": 0.5,
    }
    old = {r["target"]: r for r in bench.targets({"summary": summary})}
    assert not any("paired" in t for t in old)  # results written before the pairing
    paired = {
        "iterflow_vs_fastest_library_independent_paired": 1.6,
        "iterflow_vs_fastest_library_independent_paired_min": 1.2,
        "iterflow_vs_fastest_library_independent_paired_max": 1.9,
        "iterflow_fp32_vs_fastest_library_independent_paired": 0.99,
        "iterflow_fp32_vs_fastest_library_independent_paired_min": 0.9,
        "iterflow_fp32_vs_fastest_library_independent_paired_max": 1.1,
    }
    rows = bench.targets({"summary": {**summary, **paired}})
    got = [r for r in rows if "paired" in r["target"]]
    assert len(got) == 2
    defaults, fp32 = got
    assert defaults["target"] == "  (defaults, paired per round: median; rounds 1.20-1.90x)"
    assert (defaults["measured"], defaults["met"], defaults["wanted"]) == (1.6, True, ">= 1.5x")
    assert fp32["target"].startswith("  (fp32") and "0.90-1.10x" in fp32["target"]
    assert (fp32["measured"], fp32["met"], fp32["wanted"]) == (0.99, False, ">= 1.0x")


def test_combine_runs_gives_each_ratio_its_median(bench: ModuleType, tmp_path: Path) -> None:
    """``--combine``: a row per result file and the median of each ratio over the runs that have it
    (files written before the pairing have no paired keys)."""
    import json

    g = torch.Generator().manual_seed(0)
    keys = bench.SUMMARY_KEYS
    values = torch.rand(5, 4, generator=g, dtype=torch.float64).add(0.5).tolist()
    paths = []
    for i, v in enumerate(values):
        summary = {keys[k]: x for k, x in zip(keys, v, strict=True)}
        if i < 2:  # older format
            summary = {k: x for k, x in summary.items() if not k.endswith("_paired")}
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"summary": summary}))
    rows, medians = bench.combine_runs([str(p) for p in paths])
    assert [r["run"] for r in rows] == [f"run{i}" for i in range(5)]
    assert rows[0]["defaults_paired"] is None
    for j, k in enumerate(keys):
        have = [v[j] for i, v in enumerate(values) if i >= 2 or not k.endswith("_paired")]
        assert medians[k] == statistics.median(have)
    (tmp_path / "bad.json").write_text(json.dumps({"machine": {}}))
    with pytest.raises(ValueError, match="bad.json has no training section"):
        bench.combine_runs([str(tmp_path / "bad.json")])


@pytest.fixture(scope="module")
def like() -> ModuleType:
    return _bench_module("speed_likelihood")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_time_at_error_is_exact_on_a_power_law(like: ModuleType, seed: int) -> None:
    """Seconds ``c e^-k`` (a straight line in log-log): the interpolation returns it exactly
    between the measured errors, whatever ``c``, ``k`` and the points' order; ``None`` outside."""
    g = torch.Generator().manual_seed(seed)
    c, k = 0.1 + float(torch.rand(1, generator=g)), 0.1 + float(torch.rand(1, generator=g))
    errors = sorted((10 ** (-7 * torch.rand(5, generator=g, dtype=torch.float64))).tolist())
    curve = [(e, c * e**-k) for e in errors]
    curve = [curve[i] for i in torch.randperm(5, generator=g).tolist()]
    for t in torch.linspace(0, 1, 13, dtype=torch.float64).tolist():
        # log-uniform between the ends, the ends exactly (10 ** log10(x) may round outside them)
        e = errors[0] ** (1 - t) * errors[-1] ** t
        e = min(max(e, errors[0]), errors[-1])
        assert like.time_at_error(curve, e) == pytest.approx(c * e**-k, rel=1e-9)
    assert like.time_at_error(curve, errors[0] / 2) is None
    assert like.time_at_error(curve, errors[-1] * 2) is None


def test_time_at_error_uses_the_frontier(like: ModuleType) -> None:
    """A setting both slower and less accurate than another is not on the curve: the cheaper,
    more accurate point decides."""
    curve = [(1e-4, 4.0), (1e-3, 5.0), (1e-2, 1.0)]  # (1e-3, 5 s) is dominated by (1e-4, 4 s)
    assert like.time_at_error(curve, 1e-3) == pytest.approx(2.0)  # halfway from 4 s to 1 s
    assert like.time_at_error(curve, 1e-4) == pytest.approx(4.0)


def test_equal_accuracy_takes_the_binding_error(like: ModuleType) -> None:
    """The plain evaluator must match the mean AND the largest error: the larger time counts."""
    plain = [
        {"mean_abs_err": 1e-3, "max_abs_err": 1e-2, "seconds": 1.0},
        {"mean_abs_err": 1e-5, "max_abs_err": 1e-4, "seconds": 4.0},
    ]
    point = {"mean_abs_err": 1e-3, "max_abs_err": 1e-3, "seconds": 0.5}  # max binds: 2 s
    seconds, ratio = like.equal_accuracy_ratio(plain, point)
    assert seconds == pytest.approx(2.0) and ratio == pytest.approx(4.0)
    point = {"mean_abs_err": 1e-6, "max_abs_err": 1e-3, "seconds": 0.5}  # beyond the plain curve
    assert like.equal_accuracy_ratio(plain, point) == (None, None)


def test_targets_judge_the_equal_accuracy_ratio(bench: ModuleType) -> None:
    """2-D wants 3x, higher dimensions 2x, and the mean NLL within 1e-3 nats of the reference or
    no further from it than the plain evaluator's at 1e-5."""
    equal = [
        {"case": "checkerboard (2-D)", "best_setting": "a", "equal_accuracy_vs_plain": 2.9,
         "best_nll_minus_ref": 0.0, "plain_1e-5_nll_minus_ref": 0.0},
        {"case": "mixture (10-D)", "best_setting": "b", "equal_accuracy_vs_plain": 2.1,
         "best_nll_minus_ref": 2e-4, "plain_1e-5_nll_minus_ref": 1e-5},
        {"case": "mixture (32-D)", "best_setting": "c", "equal_accuracy_vs_plain": 2.5,
         "best_nll_minus_ref": -2e-3, "plain_1e-5_nll_minus_ref": 1e-4},
        {"case": "mixture (32-D)", "best_setting": "d", "equal_accuracy_vs_plain": 2.5,
         "best_nll_minus_ref": -2e-3, "plain_1e-5_nll_minus_ref": 3e-3},
        {"case": "mixture (64-D)", "best_setting": None, "equal_accuracy_vs_plain": None,
         "best_nll_minus_ref": None, "plain_1e-5_nll_minus_ref": 1e-3},
    ]  # fmt: skip
    rows = bench.targets({"likelihood": {"work_precision": {"equal": equal}}})
    assert [r["met"] for r in rows] == [False, True, False, True, False]
    assert [r["wanted"] for r in rows] == [">= 3x", ">= 2x", ">= 2x", ">= 2x", ">= 2x"]


def test_summary_skips_settings_whose_mean_nll_is_off(like: ModuleType) -> None:
    """The fastest setting at equal per-point accuracy does not count when its mean NLL lies
    further from the reference than 1e-3 nats and than the plain evaluator's at 1e-5."""

    def row(who: str, solver: str, norm: str, tol: float, **kw: float) -> dict:
        errors = {"nfe": 10, "nll": 0.0, "mean_abs_err": 1e-3, "max_abs_err": 1e-2}
        return {"evaluator": who, "solver": solver, "error_norm": norm, "tol": tol, **errors, **kw}

    plain = "plain torchdiffeq"
    rows = [
        row(plain, "dopri5", "batch", 1e-5, seconds=2.0, nll_minus_ref=4e-4),
        row("ours", "dopri5", "batch", 1e-5, seconds=1.0, nll_minus_ref=4e-4,
            vs_plain_at_equal_accuracy=2.0),
        row("ours", "bosh3", "batch", 1e-3, seconds=0.5, nll_minus_ref=-2e-3,
            vs_plain_at_equal_accuracy=3.0),
        row("ours", "dopri5", "rows", 1e-5, seconds=0.9, nll_minus_ref=-9e-4,
            vs_plain_at_equal_accuracy=2.2),
    ]  # fmt: skip
    out = like._equal_accuracy_summary("case", rows)
    assert out["best_setting"] == "dopri5 rows 1e-05"
    assert out["equal_accuracy_vs_plain"] == 2.2 and out["same_tolerance_vs_plain"] == 2.0
    assert like.nll_allowed(3e-3) == 3e-3 and like.nll_allowed(None) == 1e-3


def test_summary_names_bf16_settings_and_keeps_the_best_float32_one(like: ModuleType) -> None:
    """A bf16 setting can be the best overall; the best float32 ratio is reported beside it, and
    the same-tolerance row is the float32 one even when a bf16 row shares its solver and norm."""

    def row(who: str, amp: str, tol: float, seconds: float, ratio: float | None) -> dict:
        return {"evaluator": who, "solver": "dopri5", "error_norm": "batch", "autocast": amp,
                "tol": tol, "nfe": 10, "nll": 0.0, "mean_abs_err": 1e-3, "max_abs_err": 1e-2,
                "seconds": seconds, "nll_minus_ref": 1e-4, "vs_plain_at_equal_accuracy": ratio}  # fmt: skip

    rows = [
        row("plain torchdiffeq", "none", 1e-5, 3.0, None),
        row("ours", "none", 1e-5, 2.0, 1.7),
        row("ours", "none", 1e-4, 1.5, 1.9),
        row("ours", "bf16", 1e-4, 0.9, 3.1),
        row("ours", "bf16", 1e-5, 0.5, None),  # not the same-tolerance row: that is float32
    ]
    out = like._equal_accuracy_summary("case", rows)
    assert out["best_setting"] == "dopri5 batch bf16 0.0001"
    assert out["equal_accuracy_vs_plain"] == 3.1 and out["best_float32_vs_plain"] == 1.9
    assert out["same_tolerance_vs_plain"] == 1.5
    assert like.setting_name(rows[1]) == "dopri5 batch 1e-05"


def test_demo_section_scores_every_budgeted_run_and_reports_the_median(bench: ModuleType) -> None:
    """A variant with a time budget takes a different number of steps in each repeat, so each
    repeat is evaluated and the median gap is the row's; a fixed-length variant trains one model,
    evaluated once."""
    import argparse

    from iterflow.train import TrainConfig

    small = dict(data="checkerboard", hidden=(16,), n_train=2000, n_val=100, n_test=500,
                 batch_size=64, seed=1, log_every=10)  # fmt: skip
    variants = [
        ({"budget": 0.3}, TrainConfig.for_method("fm", steps=100_000, time_budget=0.3, **small)),
        ({}, TrainConfig.for_method("fm", steps=40, **small)),
    ]
    args = argparse.Namespace(demo_repeats=3, seed=0)
    budgeted, fixed = bench.bench_demo(args, torch.device("cpu"), variants)
    assert len(budgeted["gap_runs"]) == 3 and len(fixed["gap_runs"]) == 1
    assert budgeted["gap"] == statistics.median(budgeted["gap_runs"])
    assert all(10 <= s < 100_000 for s in budgeted["steps_runs"])
    assert fixed["steps_runs"] == [40, 40, 40] and fixed["gap"] == fixed["gap_runs"][0]
    assert budgeted["seconds_train"] == statistics.median(budgeted["seconds_runs"])


@pytest.mark.parametrize("native", [True, False])
def test_bf16_rows_run_only_where_bf16_is_native(
    like: ModuleType, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """On a CPU that emulates bf16 (hundreds of times slower than float32) the work-precision
    settings and the CNF/JKO training modes keep their float32 rows only; on a native-bf16 CPU,
    or off the CPU, all of them."""
    monkeypatch.setattr(like, "cpu_has_native_bf16", lambda: native)
    cpu = like.wp_settings(torch.device("cpu"))
    amps = {s[2] for s in cpu}
    assert amps == ({"none", "bf16"} if native else {"none"})
    assert [s for s in like.WP_SETTINGS if s[2] == "none"] == [s for s in cpu if s[2] == "none"]
    assert like.wp_settings(torch.device("meta")) == like.WP_SETTINGS
    assert like.bf16_native(torch.device("cpu")) is native
    modes = like.training_modes(torch.device("cpu"))
    assert [m for m in like.TRAINING_MODES if "bf16" not in m] == [
        m for m in modes if "bf16" not in m
    ]
    assert any("bf16" in m for m in modes) is native
