"""The anytime, Fig. 2 and tabular benchmark scripts (benchmarks/bench_anytime.py,
bench_fig2_tree.py, bench_tabular.py): their pure functions against direct computations, and one
tiny end-to-end run of each (a few seconds of training, tiny networks, outputs in tmp_path)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
IMG2D = Path(os.environ.get("ITERFLOW_IMG2D_DIR", BENCH.parents[1] / "shared" / "data" / "img2d"))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``bench_anytime`` as a module (the scripts import it, and ``common``, from their folder)."""
    sys.path.insert(0, str(BENCH))
    import bench_anytime

    return bench_anytime


# -- pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [45.0, 600.0, 3600.0, 5000.0])
def test_checkpoint_times_log_spaced_with_marks(bench: ModuleType, budget: float) -> None:
    t = bench.checkpoint_times(budget, first=5.0, per_decade=4, marks=(120.0, 600.0, 3600.0))
    assert t == sorted(t) and t[-1] == budget and t[0] >= 5.0
    assert all(m in t for m in (120.0, 600.0, 3600.0) if m < budget)
    ratios = np.array(t[1:]) / np.array(t[:-1])
    assert ratios.min() >= 1.2 - 1e-12  # no two targets closer than the minimal ratio
    assert ratios.max() <= 10 ** (2 / 4) + 1e-9  # a dropped grid point leaves at most two steps
    grid = [5.0 * 10 ** (i / 4) for i in range(40) if 5.0 * 10 ** (i / 4) < budget]
    kept = [g for g in grid if g in t]
    assert len(kept) >= len(grid) - 2 * len([m for m in (120, 600, 3600) if m < budget]) - 1


def test_checkpoint_times_rejects_bad_arguments(bench: ModuleType) -> None:
    with pytest.raises(ValueError):
        bench.checkpoint_times(0.0)
    with pytest.raises(ValueError):
        bench.checkpoint_times(10.0, per_decade=0)


def test_index_at_takes_the_latest_earlier_checkpoint(bench: ModuleType) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        times = sorted(rng.uniform(1, 4000, size=rng.integers(1, 12)).tolist())
        budget = float(rng.uniform(50, 5000))
        for mark in (120.0, 600.0, 3600.0):
            i = bench.index_at(times, mark, budget)
            before = [j for j, t in enumerate(times) if t <= mark]
            if budget < mark or not before:
                assert i is None
            else:
                assert i == max(before) and times[i] <= mark
                assert all(t > mark for t in times[i + 1 :])


def test_paired_difference_matches_numpy(bench: ModuleType) -> None:
    rng = np.random.default_rng(1)
    for n in (2, 17, 1000):
        shared = rng.normal(size=n) * 5  # the rows' own spread: cancels in the paired difference
        a = shared + rng.normal(0.3, 0.1, size=n)
        b = shared + rng.normal(0.0, 0.1, size=n)
        d, se = bench.paired_difference(a, b)
        diff = a - b
        assert d == pytest.approx(np.mean(diff), rel=1e-12, abs=1e-12)
        assert se == pytest.approx(np.std(diff, ddof=1) / math.sqrt(n), rel=1e-12)
        if n == 1000:  # far smaller than the unpaired standard error
            unpaired = math.hypot(np.std(a, ddof=1), np.std(b, ddof=1)) / math.sqrt(n)
            assert se < unpaired / 10
    with pytest.raises(ValueError):
        bench.paired_difference(np.zeros(1), np.zeros(1))
    m, s = bench.mean_se(np.array([1.0, 2.0, 3.0, 6.0]))
    assert (m, s) == pytest.approx((3.0, np.std([1, 2, 3, 6], ddof=1) / 2))


def test_marks_table_and_pick_lines(bench: ModuleType) -> None:
    rng = np.random.default_rng(2)
    rows = {k: rng.normal(loc, 1.0, size=500) for k, loc in (("a", 3.0), ("b", 2.9), ("c", 2.5))}
    curves = {
        "jko": {"times": [50.0, 500.0, 3000.0], "nll": [3.1, 2.9, 2.7], "se": [0.02, 0.02, 0.01],
                "rows": [rows["a"], rows["b"], rows["c"]]},
        "fm": {"times": [200.0], "nll": [2.8], "se": [0.03], "rows": [rows["b"] - 0.1]},
    }  # fmt: skip
    text = bench.marks_table(curves, 3600.0)
    lines = text.splitlines()
    assert lines[0] == "| method | NLL at 2 min | NLL at 10 min | NLL at 60 min |"
    assert lines[2] == "| JKO-flow | 3.1000 ± 0.0200 | 2.9000 ± 0.0200 | 2.7000 ± 0.0100 |"
    assert lines[3] == "| flow matching | — | 2.8000 ± 0.0300 | 2.8000 ± 0.0300 |"
    short = bench.marks_table(curves, 700.0).splitlines()
    assert short[2].endswith("| 2.9000 ± 0.0200 | — |")  # budget shorter than 60 min
    picks = bench.pick_lines(curves, 3600.0)
    assert "**JKO-flow** (3.1000)" in picks[0] and "flow matching" not in picks[0]
    assert "**flow matching** (2.8000)" in picks[1]
    d, se = bench.paired_difference(rows["b"], rows["b"] - 0.1)
    assert f"{d:.4f} ± {se:.4f}" in picks[1]
    assert "**JKO-flow** (2.7000)" in picks[2]


def test_filled_steps(bench: ModuleType) -> None:
    assert bench.filled_steps(100.0, 0.01, 1.0, 5, safety=1.0) == 1900
    steps = bench.filled_steps(3600.0, 0.05, 3.0, 6)
    assert 6 * (steps * 0.05 + 3.0) <= 0.95 * 3600.0 < 6 * ((steps + 1) * 0.05 + 3.0)
    assert bench.filled_steps(1.0, 1.0, 10.0, 3) == 1  # at least one step


def test_marginal_rate_cancels_per_run_costs(bench: ModuleType) -> None:
    gen = np.random.default_rng(3)
    for _ in range(5):
        rate, fixed, p = gen.uniform(1e-3, 1e-1), gen.uniform(0.1, 5.0), int(gen.integers(5, 500))
        got = bench.marginal_rate(p, fixed + p * rate, fixed + 2 * p * rate)
        assert got == pytest.approx(rate, rel=1e-9)
        assert (fixed + 2 * p * rate) / (2 * p) > got  # the naive rate carries the fixed cost
    assert bench.marginal_rate(10, 2.0, 1.5) == pytest.approx(1.5 / 20)  # noise: the naive rate
    with pytest.raises(ValueError, match="p must be >= 1"):
        bench.marginal_rate(0, 1.0, 2.0)


def test_overrides_set_fields_and_single_options(bench: ModuleType) -> None:
    from iterflow.train import TrainConfig

    cfg = TrainConfig.for_method("fm")
    out = bench.apply_overrides(cfg, "fm", ["fm:options.sigma=0.05", "fm:steps=10",
                                            "cnf:steps=3", "fm:hidden=32,32"])  # fmt: skip
    assert out.steps == 10 and out.hidden == (32, 32)
    assert out.options == {**cfg.options, "sigma": 0.05}  # the method's other options kept
    assert cfg.options.get("sigma") is None  # the given config is not changed
    assert bench.apply_overrides(cfg, "jko", ["fm:steps=10"]) == cfg


def test_tabular_ranking_and_gaussian(bench: ModuleType) -> None:
    import bench_tabular
    from scipy.stats import multivariate_normal

    rng = np.random.default_rng(3)
    train = rng.normal(size=(400, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0, 0, 0.5]])
    test = rng.normal(size=(50, 3))
    g = bench_tabular.gaussian_rows(train, test)
    ref = -multivariate_normal(train.mean(0), np.cov(train.T, bias=True)).logpdf(test)
    np.testing.assert_allclose(g, ref, rtol=1e-12)
    rows = {"x": g + 0.2 + rng.normal(0, 0.01, 50), "y": g, "z": g + 0.001 * rng.normal(size=50)}
    pairs = bench_tabular.ranking(rows, 3)
    assert [(p["better"], p["worse"]) for p in pairs][0][1] in ("y", "z", "x")
    first = {(p["better"], p["worse"]): p for p in pairs}
    worst = first[next(k for k in first if k[1] == "x")]
    d, se = bench.paired_difference(rows["x"], rows[worst["better"]])
    assert worst["diff_per_dim"] == pytest.approx(d / 3) and worst["se_per_dim"] == pytest.approx(
        se / 3
    )
    assert worst["resolved"]


# -- tiny end-to-end runs ------------------------------------------------------------------------

TINY = ["hidden=8,8", "n_train=400", "batch_size=64", "n_val=100"]


def overrides(methods: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[str]:
    return [a for m in methods for kv in (*TINY, *extra) for a in ("--overrides", f"{m}:{kv}")]


needs_img2d = pytest.mark.skipif(not (IMG2D / "img_rose.png").is_file(), reason="no img2d folder")


@needs_img2d
def test_anytime_end_to_end(bench: ModuleType, tmp_path: Path) -> None:
    methods = ("local-fm", "fm")  # the Fig. 2 run below covers cnf and jko
    common = ["--data", "rose", "--threads", "1", "--first", "1", "--per-decade", "2",
              "--n-test", "200", "--tol-check", "all", "--img2d-dir", str(IMG2D),
              "--results", str(tmp_path / "res"), "--img", str(tmp_path / "img"),
              "--workdir", str(tmp_path / "runs"), *overrides(methods)]  # fmt: skip
    # two separate processes' worth of runs, one method each: the report combines their parts
    for m in methods:
        bench.main([*common, "--methods", m, "--budget", "2"])
    out = json.loads((tmp_path / "res" / "anytime_rose.json").read_text())
    assert set(out["methods"]) == set(methods) and out["parts"] == sorted(methods)
    parts = tmp_path / "res" / "anytime_parts"
    with np.load(parts / "rose-fm_rows.npz") as z:
        assert z["rows"].shape == (len(z["index"]), 200) and np.isfinite(z["rows"]).all()
    # a part with other settings is left out of a report, never mixed in
    (tmp_path / "res" / "anytime_rose.json").unlink()
    bench.main([*common, "--methods", "fm", "--budget", "3", "--combine-only"])
    assert not (tmp_path / "res" / "anytime_rose.json").exists()
    bench.main([*common, "--methods", "fm", "--budget", "2", "--combine-only"])
    assert set(json.loads((tmp_path / "res" / "anytime_rose.json").read_text())["methods"]) == set(
        methods
    )
    for r in out["methods"].values():
        times = [c["train_s"] for c in r["checkpoints"]]
        assert times and times == sorted(times) and all(np.isfinite(c["nll"]) for c in
                                                        r["checkpoints"])  # fmt: skip
        assert r["tol_check"]["abs_diff"] < 0.005 and len(r["load_before"]) == 3
    assert (tmp_path / "img" / "anytime_rose.png").stat().st_size > 0
    assert "NLL at 2 min" in (tmp_path / "res" / "anytime_rose.md").read_text()
    assert all(r["machine"]["cpu"] for r in out["methods"].values())
    assert "Trained on: " in (tmp_path / "res" / "anytime_rose.md").read_text()
    # the solver check after the fact, on a subset of the test rows, from the kept run folder
    bench.main([*common, "--methods", "fm", "--budget", "2", "--tol-check-only", "50"])
    part = json.loads((parts / "rose-fm.json").read_text())
    check = part["run"]["tol_check"]
    with np.load(parts / "rose-fm_rows.npz") as z:
        last = z["rows"][list(z["index"]).index(len(part["run"]["checkpoints"]) - 1)]
    assert check["rows"] == 50 and check["abs_diff"] < 0.005
    assert check["nll"] == pytest.approx(float(last[:50].astype(np.float64).mean()), abs=2e-3)
    assert "(50 rows)" in (tmp_path / "res" / "anytime_rose.md").read_text()
    with pytest.raises(ValueError, match="no part"):
        bench.main([*common, "--methods", "cnf", "--budget", "2", "--tol-check-only", "50"])
    # ... and for a part whose run folder is gone: trained again, shown to be the same model
    again = [*common, "--workdir", str(tmp_path / "again"), "--methods", "fm", "--budget", "2",
             "--tol-check-only", "50", "--retrain"]  # fmt: skip
    bench.main(again)
    check = json.loads((parts / "rose-fm.json").read_text())["run"]["tol_check"]
    assert check["retrained"] and check["rows"] == 50 and check["abs_diff"] < 0.005
    assert 0 <= check["reproduced_max_diff"] < bench.REPRODUCE_LIMIT
    assert "model trained again" in (tmp_path / "res" / "anytime_rose.md").read_text()
    with pytest.raises(ValueError, match="not empty"):
        bench.main(again)


@needs_img2d
def test_fig2_end_to_end(tmp_path: Path, bench: ModuleType) -> None:
    import bench_fig2_tree

    bench_fig2_tree.main(["--budget", "1.5", "--threads", "1", "--methods", "cnf,jko", "--clock", "cpu",
                          "--n-test", "100", "--n-samples", "500", "--img2d-dir", str(IMG2D),
                          "--out-png", str(tmp_path / "fig2.png"),
                          "--out-json", str(tmp_path / "fig2.json"), "--workdir", str(tmp_path / "w"),
                          *overrides(("cnf", "jko"))])  # fmt: skip
    out = json.loads((tmp_path / "fig2.json").read_text())
    assert set(out["methods"]) == {"cnf", "jko"} and out["clock"] == "cpu"
    for r in out["methods"].values():  # the CPU clock is the time axis; the trainer's is kept
        c = r["checkpoints"][-1]
        assert c["clock"] == "cpu" and c["train_s"] == c["cpu_s"] and c["trainer_s"] > 0
    assert (tmp_path / "fig2.png").stat().st_size > 0
    # one method trained again, the other taken from the former run (its record and run folder)
    bench_fig2_tree.main(["--budget", "1.5", "--threads", "1", "--methods", "cnf,jko", "--clock", "cpu",
                          "--n-test", "100", "--n-samples", "500", "--img2d-dir", str(IMG2D),
                          "--out-png", str(tmp_path / "again.png"),
                          "--out-json", str(tmp_path / "again.json"), "--workdir", str(tmp_path / "w"),
                          "--reuse", str(tmp_path / "fig2.json"), "--rerun", "jko",
                          *overrides(("cnf", "jko")), "--overrides", "jko:hidden=8"])  # fmt: skip
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["methods"]["cnf"] == out["methods"]["cnf"]
    assert again["methods"]["jko"]["config"]["hidden"] == [8]
    assert (tmp_path / "again.png").stat().st_size > 0


def test_tabular_tail_figures(bench: ModuleType) -> None:
    import bench_tabular

    rng = np.random.default_rng(5)
    rows = rng.normal(40.0, 3.0, 999)
    rows = np.append(rows, 1e7)  # one row the model all but excludes
    t = bench_tabular.tail_figures(rows, dim=32, far=5.0)
    assert t["rows_far"] == 1 and t["max_per_dim"] == pytest.approx(1e7 / 32)
    assert t["median_per_dim"] == pytest.approx(np.median(rows) / 32)
    assert rows.mean() / 32 > 100 * t["median_per_dim"]  # the mean is the one row's, the median not


def test_tabular_end_to_end(tmp_path: Path, bench: ModuleType) -> None:
    import bench_tabular

    from iterflow.data.images import fashion_mnist_dir

    if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("no Fashion-MNIST files")
    bench_tabular.main(["--budget", "1.5", "--threads", "1", "--methods", "fm,jko",
                        "--n-train", "2000", "--n-test", "300", "--tol-check-n", "50",
                        "--out", str(tmp_path / "tab"), "--workdir", str(tmp_path / "work"),
                        *overrides(("fm", "jko"), ("n_val=100",))])  # fmt: skip
    out = json.loads((tmp_path / "tab.json").read_text())
    assert set(out["models"]) == {"gaussian", "fm", "jko"}
    assert out["runs"]["fm"]["config"]["options"]["sigma"] == 0.05  # FM_TABLE_OPTIONS
    assert "sigma" not in out["runs"]["jko"]["config"]["options"]
    assert len(out["ranking"]) == 3 and out["n_test"] == 300
    assert out["tol_check"]["abs_diff"] < 0.005
    assert "Paired comparisons" in (tmp_path / "tab.md").read_text()
    per_row = np.load(tmp_path / "tab_rows.npz")
    for name, model in out["models"].items():  # the report's figures are those of the saved rows
        assert per_row[name].shape == (300,)
        assert model["nll"] == pytest.approx(per_row[name].mean())
        assert model["median_per_dim"] == pytest.approx(np.median(per_row[name]) / 32)
    # re-evaluating the finished run's models (no training) reproduces its figures
    bench_tabular.main(["--threads", "1", "--n-train", "2000", "--n-test", "300",
                        "--tol-check-n", "0", "--workdir", str(tmp_path / "work"),
                        "--reevaluate", str(tmp_path / "tab.json"),
                        "--out", str(tmp_path / "again")])  # fmt: skip
    again = json.loads((tmp_path / "again.json").read_text())
    for name in ("fm", "jko"):
        assert again["models"][name]["nll"] == pytest.approx(out["models"][name]["nll"], abs=1e-9)
        assert again["models"][name]["train_s"] == out["models"][name]["train_s"]


def test_bench_presets_trains_then_records_and_refuses_another_config(tmp_path: Path) -> None:
    """bench_presets.py trains a preset through the CLI (here rose-jko, made tiny and moved to the
    built-in checkerboard by --set), records the run's metrics; a second call records the finished
    run without training it again; a folder holding another config is refused."""
    import subprocess

    script = str(BENCH / "bench_presets.py")
    tiny = "--data checkerboard --steps 10 --blocks 2 --batch-size 64 --hidden 16,16 --n-train 400"
    tiny += " --n-val 64 --n-test 64"
    out = tmp_path / "presets.json"
    argv = [sys.executable, script, "--preset", "rose-jko", "--set", tiny, "--threads", "1"]
    argv += ["--eval-n", "64", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    subprocess.run(argv, check=True, capture_output=True, text=True)
    (row,) = json.loads(out.read_text())["runs"].values()
    assert (
        row["preset"] == "rose-jko" and row["blocks"] == 2 and not row["recorded_from_existing_run"]
    )
    assert math.isfinite(row["nll"]) and row["nll_stderr"] > 0 and row["train_seconds"] > 0
    assert "--config rose-jko" in row["command"] and row["threads"] == 1
    again = subprocess.run(argv, check=True, capture_output=True, text=True)
    (row2,) = json.loads(out.read_text())["runs"].values()
    assert row2["recorded_from_existing_run"] and row2["nll"] == row["nll"], again.stdout
    (run,) = (tmp_path / "runs").iterdir()
    other = [a if a != tiny else tiny.replace("--steps 10", "--steps 11") for a in argv]
    (tmp_path / "runs" / run.name.replace("steps10", "steps11")).symlink_to(run)
    bad = subprocess.run(other, capture_output=True, text=True)
    assert bad.returncode != 0 and "holds another config" in bad.stderr


def test_fourier_2d_end_to_end(tmp_path: Path, bench: ModuleType) -> None:
    import bench_fourier_2d

    bench_fourier_2d.main(["--data", "moons", "--threads", "1", "--n-test", "200",
                           "--variant", '{"steps": 30, "batch_size": 128}',
                           "--variant", '{"steps": 20, "batch_size": 128, "x_freqs": 8}',
                           "--out", str(tmp_path / "f2d")])  # fmt: skip
    out = json.loads((tmp_path / "f2d.json").read_text())
    first, second = out["rows"]
    assert (first["steps"], second["steps"]) == (30, 20)
    assert "minus_first" not in first and math.isfinite(second["minus_first_se"])
    # the paired difference is that of the two means (the same test rows)
    assert second["minus_first"] == pytest.approx(second["nll"] - first["nll"], abs=1e-9)
    assert "x_freqs" in (tmp_path / "f2d.md").read_text()


def test_trained_on_names_each_host_only_when_they_differ(bench: ModuleType) -> None:
    one = {"jko": {"machine": {"cpu": "A"}}, "cnf": {"machine": {"cpu": "A"}}}
    assert bench.trained_on(one) == "Trained on: A (every method)."
    two = {"jko": {"machine": {"cpu": "A"}}, "cnf": {}}
    line = bench.trained_on(two)
    assert "JKO-flow: A" in line and "CNF: not recorded" in line


def test_denormals_end_to_end(tmp_path: Path) -> None:
    """bench_denormals.py on a tiny flow-matching run: the children run with the flushing asked
    for (it raises otherwise), and flushing leaves the weights as they are."""
    import subprocess

    out = tmp_path / "denormals.json"
    argv = [sys.executable, str(BENCH / "bench_denormals.py"), "--data", "checkerboard",
            "--set", "hidden=[16, 16]", "--set", "batch_size=64", "--set", "x_freqs=8",
            "--set", "n_train=2000", "--set", "n_val=64", "--total-steps", "400",
            "--train-steps", "40", "--steps", "20", "--rounds", "2", "--threads", "1",
            "--workdir", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["settings"]["train_steps"] == 40
    assert all(len(v) == 2 and min(v) > 0 for v in res["steps_per_s"].values())
    assert res["max_diff_after_resume"]["param"] == 0.0
    assert res["max_diff_after_resume"]["ema"] == 0.0
    zeros = res["census"]["zero_fraction_per_hidden_layer"]
    assert len(zeros) == 2 and all(0.0 <= z <= 1.0 for z in zeros)
