"""Worst-case sampling (FlowDRO): closed-form maps, classifier attacks, baseline, I/O, resumption,
data parallelism and the CLI.

The worker half of the two-process test runs under ``python -m torch.distributed.run`` (``--worker``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from iterflow.apps.dro import (
    ClassifierLoss,
    DROConfig,
    LabelledLinearRisk,
    LinearRisk,
    QuadraticRisk,
    accuracy,
    assess,
    calibrate_ascent,
    fit_worst_case,
    gradient_ascent,
    labelled_data,
    load_classifier,
    load_reference,
    load_worst_case,
    parse_risk,
    plot_digit_pairs,
    plot_displacement,
    save_classifier,
    save_worst_case,
    train_classifier,
    transfer_displacement,
)
from iterflow.errors import InputError

# small nets, float64, few solver steps: the closed-form maps are smooth (a shift, a linear map)
FAST = dict(
    hidden=(32, 32), ode_steps=2, steps=300, batch_size=128, lr=1e-2, dtype="float64", log_every=50
)
Q = [[2.0, 0.5], [0.5, 1.0]]
B = [1.0, -0.5]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second intra-op thread only adds synchronisation (and spins on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def points(n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5], dtype=torch.float64
    )


def rel_err(y: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> float:
    """sqrt(E|y - y*|^2 / E|y* - x|^2): map error relative to the optimal displacement."""
    y = y.detach()
    return float((((y - ys) ** 2).sum(1).mean() / ((ys - x) ** 2).sum(1).mean()).sqrt())


@pytest.mark.parametrize("kw", [{}, {"kinetic": 1.0}], ids=["plain", "kinetic"])
def test_linear_risk_gives_the_shift(kw: dict) -> None:
    gamma, risk = 0.5, LinearRisk([1.0, -2.0])
    x = points()
    res = fit_worst_case(x, risk, config=DROConfig(gamma=gamma, **FAST, **kw))
    x_new = points(128, seed=1)  # the map is a function: it must hold on new points too
    for z in (x, x_new):
        assert rel_err(res.map(z), risk.optimal_map(z, gamma), z) < 0.02
    a2 = float((risk.a**2).sum())
    assert res.train.transport_cost == pytest.approx(gamma**2 * a2, rel=0.03)  # |gamma a|^2
    assert res.train.risk_increase == pytest.approx(gamma * a2, rel=0.03)  # a . gamma a
    assert [h["step"] for h in res.history] == list(range(50, 301, 50))
    gammas = [h["gamma"] for h in res.history]  # warmed up geometrically from gamma / 16
    assert gammas[0] < gammas[1] < gamma and gammas[-1] == gamma


def labelled_pairs(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every point twice, once with label 0 and once with label 1 (labels independent of x)."""
    x = points(n, seed)
    return torch.cat([x, x]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


A2 = [[1.0, 0.0], [-1.0, 0.5]]


def test_conditioned_map_moves_labels_apart() -> None:
    """R(y; c) = a_c . y: the optimum x + gamma a_c moves two labels at one place in two directions."""
    gamma, risk = 0.5, LabelledLinearRisk(A2)
    x, c = labelled_pairs()
    res = fit_worst_case(x, risk, labels=c, config=DROConfig(gamma=gamma, **FAST))
    assert res.map.num_classes == 2
    x_new, c_new = labelled_pairs(64, seed=1)
    for z, lab in ((x, c), (x_new, c_new)):
        assert rel_err(res.map(z, lab), risk.optimal_map(z, gamma, lab), z) < 0.03
    z = points(64, seed=2)
    zero, one = torch.zeros(64).long(), torch.ones(64).long()
    gap = res.map(z, zero) - res.map(z, one)  # same points, different labels
    want = gamma * (risk.a[0] - risk.a[1])
    assert torch.allclose(gap.detach(), want.expand_as(gap), atol=0.03)
    gain = res.train.risk_increase - res.train.transport_cost / (2 * gamma)
    assert gain == pytest.approx(gamma * 1.125 / 2, rel=0.03)  # gamma E|a_c|^2 / 2
    # a map of x alone can only take the label-averaged step x + gamma (a_0 + a_1) / 2
    plain = fit_worst_case(
        x, risk, labels=c, config=DROConfig(gamma=gamma, condition="none", **FAST)
    )
    assert plain.map.num_classes == 0
    avg = x + gamma * risk.a.mean(0)
    assert torch.allclose(plain.map(x).detach(), avg, atol=0.03)  # not x + gamma a_c: off by 0.56
    assert plain.train.objective < res.train.objective - 0.2  # gamma |E a_c|^2 / 2 = 0.016
    with pytest.raises(InputError, match=r"labels.*num_classes=2"):
        res.map(z)
    with pytest.raises(InputError, match=r"labels.*\(64,\)"):
        res.map(z, zero[:5])
    with pytest.raises(InputError, match=r"labels.*\[0, 2\)"):
        res.map(z, zero + 2)
    with pytest.raises(InputError, match="labels"):
        fit_worst_case(
            x, risk, config=DROConfig(gamma=gamma, steps=1)
        )  # a labelled risk needs them


def test_quadratic_risk_gives_the_linear_map() -> None:
    gamma, risk = 0.5, QuadraticRisk(Q, B)
    x = points()
    res = fit_worst_case(x, risk, config=DROConfig(gamma=gamma, **FAST))
    assert rel_err(res.map(x), risk.optimal_map(x, gamma), x) < 0.03
    assert (
        rel_err(res.map(points(128, 1)), risk.optimal_map(points(128, 1), gamma), points(128, 1))
        < 0.05
    )
    # the optimum is a linear map: check it against the formula directly
    m = torch.linalg.inv(
        torch.eye(2, dtype=torch.float64) + gamma * torch.tensor(Q, dtype=torch.float64)
    )
    assert torch.allclose(
        risk.optimal_map(x, gamma), (x + gamma * torch.tensor(B, dtype=torch.float64)) @ m.T
    )


def test_progressive_chain_composes_proximal_steps() -> None:
    gamma, k, risk = 0.6, 2, QuadraticRisk(Q, B)
    x = points()
    res = fit_worst_case(
        x, risk, config=DROConfig(gamma=gamma, blocks=k, schedule="progressive", **FAST)
    )
    ys = x
    for _ in range(k):  # K proximal steps of size gamma / K
        ys = risk.optimal_map(ys, gamma / k)
    assert rel_err(res.map(x), ys, x) < 0.04
    assert (
        rel_err(res.map(x), risk.optimal_map(x, gamma), x) > 0.05
    )  # a different map than one step


@pytest.mark.parametrize("step_size", [None, 0.1], ids=["adaptive", "fixed"])
def test_gradient_ascent_reaches_the_proximal_point(step_size: float | None) -> None:
    gamma, risk = 0.5, QuadraticRisk(Q, B)
    x = points(64)
    res = gradient_ascent(x, risk, gamma=gamma, steps=200, step_size=step_size)
    assert torch.allclose(res.points, risk.optimal_map(x, gamma), atol=1e-10)
    assert res.adaptive == (step_size is None) and res.gradient_evaluations == 200 + res.adaptive


def test_adaptive_ascent_never_decreases_the_objective() -> None:
    """A sharp risk (R = 50 sin(5 y_1)) makes the fixed step oscillate; per-sample control must not."""
    x = points(64)
    gamma = 0.5

    def risk(y: torch.Tensor) -> torch.Tensor:
        return 50 * torch.sin(5 * y[:, 0])

    def objective(z: torch.Tensor) -> torch.Tensor:
        return risk(z) - ((z - x) ** 2).sum(1) / (2 * gamma)

    prev = objective(x)
    for steps in (1, 5, 20):
        j = objective(gradient_ascent(x, risk, gamma=gamma, steps=steps).points)
        assert bool((j >= prev - 1e-12).all())
        prev = j
    fixed = objective(gradient_ascent(x, risk, gamma=gamma, steps=20, step_size=gamma / 5).points)
    assert float(prev.mean()) > float(fixed.mean())


def test_calibrated_ascent_matches_the_cost_and_transfer_reuses_steps() -> None:
    risk = LinearRisk([1.0, 0.0])
    x = points(64)
    res = calibrate_ascent(x, risk, target_cost=0.09, steps=60)
    cost = float(((res.points - x) ** 2).sum(1).mean())
    assert cost == pytest.approx(0.09, rel=1e-3)
    assert res.gamma == pytest.approx(0.3, rel=1e-3)  # the shift gamma a has cost gamma^2
    quad = gradient_ascent(x, QuadraticRisk(Q, B), gamma=0.5, steps=50)  # displacements vary with x
    new = x[:5] + 1e-6  # each new point's nearest training point is its twin
    assert torch.allclose(transfer_displacement(x, quad.points, new) - new, quad.points[:5] - x[:5])


@pytest.fixture(scope="module")
def moons() -> tuple:
    data = labelled_data("moons", 300, 300, seed=0)
    clf = train_classifier(data.train_x, data.train_y, hidden=(32, 32), steps=400, seed=0)
    return data, clf


def test_classifier_accuracy_drops_as_gamma_grows(moons: tuple) -> None:
    data, clf = moons
    clean = accuracy(clf, data.test_x, data.test_y)
    assert clean > 0.95
    cfg = dict(hidden=(32, 32), ode_steps=2, steps=250, lr=1e-2, batch_size=128)
    acc, risk, cost = [], [], []
    for gamma in (0.02, 0.5):
        res = fit_worst_case(
            data.train_x, clf, labels=data.train_y, config=DROConfig(gamma=gamma, **cfg)
        )
        y = res.map(data.test_x, labels=data.test_y)
        a = assess(data.test_x, y, ClassifierLoss(clf), data.test_y, gamma)
        acc.append(a.accuracy_after)
        risk.append(a.risk_after)
        cost.append(a.transport_cost)
        assert a.accuracy_before == pytest.approx(clean)
    assert acc[0] <= clean + 1e-9 and acc[1] < acc[0] - 0.3
    assert risk[1] > risk[0] and cost[1] > cost[0]


def test_classifier_without_labels_attacks_its_predictions(moons: tuple) -> None:
    data, clf = moons
    res = fit_worst_case(
        data.train_x[:64], ClassifierLoss(clf), config=DROConfig(gamma=0.5, steps=5)
    )
    assert res.train.accuracy_before == pytest.approx(1.0)  # labels = predictions


def test_labelled_sets_are_seeded_and_digits_standardised() -> None:
    a, b = labelled_data("moons", 50, 20, seed=3), labelled_data("moons", 50, 20, seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, labelled_data("moons", 50, 20, seed=4).train_x)
    d = labelled_data("sklearn:digits", 2000, 2000, seed=0)
    assert d.train_x.shape[1] == 64 and d.classes == 10 and d.image_shape == (1, 8, 8)
    assert d.train_x.shape[0] + d.test_x.shape[0] == 1797
    assert torch.allclose(d.train_x.mean(0), torch.zeros(64), atol=1e-5)
    px = d.to_pixels(d.test_x)
    assert px.shape[1:] == (1, 8, 8) and float(px.min()) > -1e-4 and float(px.max()) < 16 + 1e-4
    with pytest.raises(InputError, match="name"):
        labelled_data("nope")


def test_save_load_round_trip(tmp_path: Path, moons: tuple) -> None:
    x = points(64)
    res = fit_worst_case(
        x, LinearRisk([1.0, 0.0]), config=DROConfig(gamma=0.5, blocks=2, **{**FAST, "steps": 5})
    )
    save_worst_case(res, tmp_path / "run")
    back = load_worst_case(tmp_path / "run")
    assert (
        torch.equal(back.map(x), res.map(x))
        and back.config == res.config
        and back.train == res.train
    )
    assert torch.allclose(back.map.inverse(back.map(x)), x, atol=1e-6)
    _, clf = moons
    save_classifier(clf, tmp_path / "run")
    clf2 = load_classifier(tmp_path / "run")
    z = torch.randn(8, 2)
    assert torch.equal(clf(z), clf2(z))
    (tmp_path / "run" / "blocks" / "block_001.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="safetensors"):
        load_worst_case(tmp_path / "run")


def test_conditioned_save_load_round_trip(tmp_path: Path) -> None:
    from iterflow.core.nn import MLPVelocity, build_network

    x, c = labelled_pairs(32)
    cfg = DROConfig(gamma=0.5, blocks=2, schedule="progressive", **{**FAST, "steps": 5})
    res = fit_worst_case(x, LabelledLinearRisk(A2), labels=c, config=cfg)
    save_worst_case(res, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [n["num_classes"] for n in meta["networks"]] == [2, 2]
    back = load_worst_case(tmp_path / "run")
    assert back.map.num_classes == 2 and back.config == res.config and back.train == res.train
    assert torch.equal(back.map(x, c), res.map(x, c))
    assert torch.allclose(back.map.inverse(back.map(x, c), c), x, atol=1e-6)
    assert back.map.trajectory(x, c).shape == (2 * FAST["ode_steps"] + 1, 64, 2)
    with pytest.raises(InputError, match="labels"):
        back.map(x)
    # the network config round-trips; configs written before conditioning load unconditional
    net = MLPVelocity(3, hidden=(8,), num_classes=4)
    assert build_network(net.config()).config() == net.config()
    old = {"kind": "mlp", "dim": 3, "hidden": [8], "activation": "silu", "time_freqs": 0}
    assert build_network(old).num_classes == 0 and "num_classes" not in build_network(old).config()
    with pytest.raises(InputError, match="labels"):
        build_network(old)(torch.zeros(2, 3), 0.5, torch.zeros(2).long())
    # a run saved before these options existed: a map of x alone at a fixed gamma
    legacy = {
        k: v for k, v in res.config.to_json().items() if k not in ("condition", "gamma_warmup")
    }
    assert DROConfig.from_json(legacy).condition == "none"
    assert DROConfig.from_json(legacy).gamma_warmup == 0.0


def test_reference_from_a_trained_run(tmp_path: Path) -> None:
    from iterflow.train import TrainConfig, train

    cfg = TrainConfig(
        data="8gaussians", steps=5, batch_size=64, hidden=(16,), n_train=200, n_val=20, n_test=20
    )
    train(cfg, tmp_path / "run")
    ref = load_reference(tmp_path / "run", n_train=30, n_test=10, seed=1, solver="rk4", steps=4)
    assert ref.train.shape == (30, 2) and ref.test.shape == (10, 2) and ref.source["kind"] == "run"
    again = load_reference(tmp_path / "run", n_train=30, n_test=10, seed=1, solver="rk4", steps=4)
    assert torch.equal(ref.train, again.train)  # seeded draw


def test_reference_from_a_data_set_name_and_risk_parsing() -> None:
    ref = load_reference("8gaussians", n_train=50, n_test=20, seed=0)
    assert ref.train.shape == (50, 2) and ref.test.shape == (20, 2) and ref.train_labels is None
    assert torch.equal(parse_risk("linear:1,2", 2).a, torch.tensor([1.0, 2.0], dtype=torch.float64))
    q = parse_risk("quadratic:1,2;0,1", 2)
    assert torch.equal(q.q, torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    assert torch.equal(parse_risk("quadratic:3", 2).q, 3 * torch.eye(2, dtype=torch.float64))
    for bad in (
        "linear:1",
        "quadratic:1,2,3",
        "quadratic:-1",
        "cubic:1",
        "linear:a,b",
        "quadratic:1,2;1",
    ):
        with pytest.raises(InputError, match="spec"):
            parse_risk(bad, 2)


def test_input_errors() -> None:
    x = points(16)
    with pytest.raises(InputError, match="gamma"):
        DROConfig(gamma=0.0)
    with pytest.raises(InputError, match="solver"):
        DROConfig(solver="dopri5")  # training integrates with a fixed-step solver
    with pytest.raises(InputError, match="risk"):
        fit_worst_case(x, lambda y: y, config=DROConfig(steps=1))  # (B, d) instead of (B,)
    with pytest.raises(InputError, match="labels"):
        fit_worst_case(x, LinearRisk([1.0, 0.0]), labels=torch.zeros(16, dtype=torch.int64))
    with pytest.raises(InputError, match="Q"):
        QuadraticRisk([[1.0, 0.0], [0.0, -1.0]])
    with pytest.raises(InputError, match="reference"):
        fit_worst_case(x[:, :1].long(), LinearRisk([1.0]))


def test_plots(tmp_path: Path) -> None:
    x = points(50)
    assert (
        plot_displacement(x, x + 0.1, tmp_path / "a.png", torch.arange(50) % 2).stat().st_size > 0
    )
    img = torch.rand(10, 1, 8, 8)
    assert plot_digit_pairs(img, img.flip(-1), tmp_path / "b.png", value_range=(0.0, 1.0)).exists()


def _cli(argv: list[str]) -> int:
    from iterflow.cli import app, main, worst_case

    if not any(c.name == "worst-case" for c in app.registered_commands):
        worst_case.register(app)  # until the CLI registers iterflow.commands itself
    return main(argv)


def test_cli_writes_a_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "wc"
    code = _cli(
        [
            "worst-case",
            "--reference",
            "8gaussians",
            "--risk",
            "linear:1,0",
            "--gamma",
            "0.3",
            "--steps",
            "40",
            "--ode-steps",
            "2",
            "--hidden",
            "16",
            "--n-train",
            "200",
            "--n-test",
            "100",
            "--ascent-steps",
            "20",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"flow", "baseline", "closed_form"} <= set(m) and m["flow"]["test"]["n"] == 100
    assert m["baseline"]["train"]["transport_cost"] == pytest.approx(
        m["flow"]["train"]["transport_cost"], rel=1e-2
    )
    assert (out / "worst_case.png").exists() and (out / "manifest.json").exists()
    assert load_worst_case(out).config.gamma == 0.3
    assert not m["flow"]["conditioned_on_labels"]


def test_cli_classifier_map_is_conditioned(tmp_path: Path) -> None:
    out = tmp_path / "wc"
    args = ["--gamma", "0.2", "--steps", "30", "--ode-steps", "2", "--hidden", "16"]
    args += ["--n-train", "200", "--n-test", "100", "--classifier-steps", "100"]
    args += ["--classifier-hidden", "16", "--ascent-steps", "10", "--no-baseline"]
    code = _cli(
        ["worst-case", "--reference", "moons", "--risk", "classifier", *args]
        + ["--out", str(out), "--quiet"]
    )
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["flow"]["conditioned_on_labels"] and m["flow"]["test"]["n"] == 100
    back = load_worst_case(out)
    assert back.map.num_classes == 2 and back.config.condition == "auto"
    ref = load_reference("moons", n_train=200, n_test=100, seed=0)
    clf = load_classifier(out)
    held = assess(
        ref.test, back.map(ref.test, ref.test_labels), ClassifierLoss(clf), ref.test_labels
    )
    assert held.risk_after == pytest.approx(m["flow"]["test"]["risk_after"], rel=1e-5)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        _cli(
            [
                "worst-case",
                "--reference",
                "8gaussians",
                "--risk",
                "linear:1",
                "--out",
                str(tmp_path / "x"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "--risk" in capsys.readouterr().err
    assert (
        _cli(
            [
                "worst-case",
                "--reference",
                "8gaussians",
                "--risk",
                "classifier",
                "--out",
                str(tmp_path / "y"),
                "--quiet",
            ]
        )
        == 2
    )
    capsys.readouterr()
    for flag, value in (("--condition", "labels"), ("--gamma-warmup", "1.5")):
        argv = ["worst-case", "--reference", "8gaussians", "--risk", "linear:1,0", flag, value]
        assert _cli([*argv, "--out", str(tmp_path / "z"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert flag in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# Resumption, run folders, devices and data parallelism
# ------------------------------------------------------------------------------------------------

# 63-row minibatches: two ranks get 32 and 31 rows
RESUME = dict(hidden=(16,), ode_steps=2, steps=20, batch_size=63, dtype="float64", log_every=5,
              checkpoint_every=4, kinetic=0.5)  # fmt: skip


def _params(res: object) -> list[torch.Tensor]:
    return [p.detach().clone() for p in res.map.flow.parameters()]  # type: ignore[attr-defined]


def _same_fit(a: object, b: object) -> None:
    """Two fits gave the same map, bit for bit, and the same record."""
    for p, q in zip(_params(a), _params(b), strict=True):
        assert torch.equal(p, q)
    assert a.history == b.history and a.train == b.train  # type: ignore[attr-defined]


@pytest.mark.parametrize("schedule", ["joint", "progressive"])
def test_interrupted_fit_resumes_to_the_uninterrupted_map(tmp_path: Path, schedule: str) -> None:
    x, c = labelled_pairs(40)
    risk = LabelledLinearRisk(A2)
    cfg = DROConfig(gamma=0.5, blocks=2, schedule=schedule, **RESUME)
    whole = fit_worst_case(x, risk, labels=c, config=cfg)  # no folder: nothing written
    # stop inside the last phase (progressive: block 0 is finished and committed by then)
    stop = 30 if schedule == "progressive" else 13
    with pytest.raises(KeyboardInterrupt):
        fit_worst_case(
            x, risk, labels=c, config=cfg, folder=tmp_path / "run", stop_after_steps=stop
        )
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["kind"] == "worst-case" and "train" not in m
    assert m["phases"].get("map", {}).get("blocks_done", 0) == (
        1 if schedule == "progressive" else 0
    )
    assert (tmp_path / "run" / "progress.safetensors").exists()
    resumed = fit_worst_case(x, risk, labels=c, config=cfg, folder=tmp_path / "run")
    _same_fit(resumed, whole)
    assert [h["step"] for h in resumed.history if h["block"] == 0] == [5, 10, 15, 20]
    assert not (tmp_path / "run" / "progress.safetensors").exists()
    # a finished folder loads its map: nothing is trained again (a budget of 0 steps would stop it)
    again = fit_worst_case(
        x, risk, labels=c, config=cfg, folder=tmp_path / "run", stop_after_steps=0
    )
    _same_fit(again, whole)
    back = load_worst_case(tmp_path / "run")
    assert torch.equal(back.map(x, c), resumed.map(x, c)) and back.history == whole.history


def test_folder_of_another_config_or_reference_is_refused(tmp_path: Path) -> None:
    x = points(32)
    cfg = DROConfig(gamma=0.5, **{**RESUME, "steps": 4})
    fit_worst_case(x, LinearRisk([1.0, 0.0]), config=cfg, folder=tmp_path / "run")
    with pytest.raises(InputError, match=r"folder.*another config.*gamma"):
        fit_worst_case(x, LinearRisk([1.0, 0.0]), config=DROConfig(gamma=0.4, **{**RESUME, "steps": 4}),
                       folder=tmp_path / "run")  # fmt: skip
    with pytest.raises(InputError, match=r"folder.*other reference points"):
        fit_worst_case(x + 1, LinearRisk([1.0, 0.0]), config=cfg, folder=tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"folder.*new or empty folder"):
        fit_worst_case(x, LinearRisk([1.0, 0.0]), config=cfg, folder=tmp_path / "other")
    # runtime settings may change on resume
    fit_worst_case(x, LinearRisk([1.0, 0.0]), config=dataclasses.replace(cfg, checkpoint_every=7),
                   folder=tmp_path / "run")  # fmt: skip


def test_interrupted_classifier_resumes_to_the_uninterrupted_one(tmp_path: Path) -> None:
    data = labelled_data("moons", 200, 10, seed=0)
    x, y = data.train_x.double(), data.train_y
    kw = dict(hidden=(16,), steps=20, batch_size=63, seed=0, checkpoint_every=4)
    whole = train_classifier(x, y, **kw)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, **kw, folder=tmp_path, stop_after_steps=11)
    resumed = train_classifier(x, y, **kw, folder=tmp_path)
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not (tmp_path / "progress.json").exists()
    loaded = train_classifier(
        x, y, **kw, folder=tmp_path, stop_after_steps=0
    )  # loaded, not trained
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), loaded.parameters()))
    with pytest.raises(InputError, match=r"folder.*other settings.*steps"):
        train_classifier(x, y, **{**kw, "steps": 21}, folder=tmp_path)


def test_newer_or_unfinished_folders_are_refused(tmp_path: Path) -> None:
    x = points(32)
    cfg = DROConfig(gamma=0.5, **{**RESUME, "steps": 4})
    fit_worst_case(x, LinearRisk([1.0, 0.0]), config=cfg, folder=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(InputError, match=r"run.*newer"):
        load_worst_case(tmp_path / "run")
    with pytest.raises(InputError, match=r"folder.*newer"):
        fit_worst_case(x, LinearRisk([1.0, 0.0]), config=cfg, folder=tmp_path / "run")
    unfinished = {k: v for k, v in m.items() if k != "train"}
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(unfinished))
    with pytest.raises(InputError, match=r"run.*finished map"):
        load_worst_case(tmp_path / "run")


def test_folders_of_earlier_versions_still_load(tmp_path: Path) -> None:
    """A map saved as dro.json (before the manifest) loads; such a folder is not resumed."""
    x = points(32)
    res = fit_worst_case(
        x, LinearRisk([1.0, 0.0]), config=DROConfig(gamma=0.5, **{**RESUME, "steps": 3})
    )
    save_worst_case(res, tmp_path / "old")
    m = json.loads((tmp_path / "old" / "manifest.json").read_text())
    legacy = {k: m[k] for k in ("config", "event_shape", "networks", "train", "history", "seconds")}
    legacy["config"] = {k: v for k, v in legacy["config"].items()
                        if k not in ("device", "autocast", "checkpoint_every")}  # fmt: skip
    (tmp_path / "old" / "dro.json").write_text(json.dumps({"format_version": 1, **legacy}))
    (tmp_path / "old" / "manifest.json").unlink()
    back = load_worst_case(tmp_path / "old")
    assert torch.equal(back.map(x), res.map(x)) and back.train == res.train
    with pytest.raises(InputError, match=r"folder.*older format"):
        fit_worst_case(x, LinearRisk([1.0, 0.0]), config=res.config, folder=tmp_path / "old")


def _cli_linear(out: Path, *extra: str) -> int:
    args = ["worst-case", "--reference", "8gaussians", "--risk", "linear:1,0", "--gamma", "0.3"]
    args += ["--steps", "30", "--ode-steps", "2", "--hidden", "16", "--n-train", "100"]
    args += ["--n-test", "50", "--ascent-steps", "10", "--checkpoint-every", "7", "--quiet"]
    return _cli([*args, *extra, "--out", str(out)])


def test_cli_resumes_an_interrupted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import iterflow.apps.dro.fit as fit_module
    from iterflow.train.loop import StepBudget

    assert _cli_linear(tmp_path / "whole") == 0
    with monkeypatch.context() as mp:  # simulate a kill after the checkpoint of step 14
        mp.setattr(fit_module, "StepBudget", lambda _steps: StepBudget(17))
        assert _cli_linear(tmp_path / "cut") == 130
    assert (tmp_path / "cut" / "progress.safetensors").exists()
    assert not (tmp_path / "cut" / "metrics.json").exists()
    assert _cli_linear(tmp_path / "cut") == 0  # the same command resumes
    a, b = (load_worst_case(tmp_path / f) for f in ("whole", "cut"))
    z = points(16)
    assert torch.equal(a.map(z.float()), b.map(z.float())) and a.history == b.history
    ma, mb = (json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("whole", "cut"))
    assert ma["flow"]["test"] == mb["flow"]["test"] and ma["baseline"] == mb["baseline"]
    assert _cli_linear(tmp_path / "cut") == 0  # a finished folder: evaluated again, not retrained


def test_cli_refuses_another_config_or_a_newer_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "wc"
    assert _cli_linear(out) == 0
    capsys.readouterr()
    assert _cli_linear(out, "--lr", "0.02") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "another config" in err and len(err.strip().splitlines()) == 1
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    assert _cli_linear(out) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "newer" in err
    (tmp_path / "file").write_text("x")
    assert _cli_linear(tmp_path / "file") == 2
    assert "--out" in capsys.readouterr().err


def test_cli_device_and_dtype(tmp_path: Path) -> None:
    out = tmp_path / "wc"
    assert _cli_linear(out, "--device", "cpu", "--dtype", "float64", "--autocast", "none") == 0
    back = load_worst_case(out)
    assert back.config.dtype == "float64" and back.config.device == "cpu"
    assert back.map.dtype == torch.float64
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["dtype"] == "float64" and m["settings"]["reference"] == "8gaussians"


def test_cli_classifier_folder_resumes(tmp_path: Path) -> None:
    out = tmp_path / "wc"
    args = ["worst-case", "--reference", "moons", "--risk", "classifier", "--gamma", "0.2"]
    args += ["--steps", "10", "--ode-steps", "2", "--hidden", "16", "--n-train", "100"]
    args += ["--n-test", "50", "--classifier-steps", "20", "--classifier-hidden", "16"]
    args += ["--no-baseline", "--quiet", "--out", str(out)]
    assert _cli(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["phases"]["classifier"]["done"] and m["phases"]["map"]["done"]
    first = json.loads((out / "metrics.json").read_text())
    assert _cli(args) == 0  # classifier and map loaded, not retrained
    assert json.loads((out / "metrics.json").read_text())["flow"] == first["flow"]


TWO = dict(hidden=(16,), ode_steps=2, steps=12, batch_size=63, dtype="float64", log_every=4,
           checkpoint_every=5, kinetic=0.5, blocks=2, schedule="progressive")  # fmt: skip


def _two_process_fits(folder: Path) -> None:
    x, c = labelled_pairs(40)
    fit_worst_case(x, LabelledLinearRisk(A2), labels=c, config=DROConfig(gamma=0.5, **TWO),
                   folder=folder / "map")  # fmt: skip
    data = labelled_data("moons", 100, 10, seed=0)
    clf = train_classifier(data.train_x.double(), data.train_y, hidden=(16,), steps=12,
                           batch_size=63, folder=folder / "clf")  # fmt: skip
    assert clf is not None


@pytest.mark.slow
def test_two_gloo_processes_fit_the_same_map_as_one(tmp_path: Path) -> None:
    _two_process_fits(tmp_path / "one")
    path = os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", str(tmp_path / "two")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    x, c = labelled_pairs(40)
    one, two = load_worst_case(tmp_path / "one" / "map"), load_worst_case(tmp_path / "two" / "map")
    for p, q in zip(one.map.flow.parameters(), two.map.flow.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-9), float((p - q).abs().max())
    assert torch.allclose(one.map(x, c), two.map(x, c), rtol=0, atol=1e-9)
    c1, c2 = load_classifier(tmp_path / "one" / "clf"), load_classifier(tmp_path / "two" / "clf")
    for p, q in zip(c1.parameters(), c2.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-9)


if __name__ == "__main__" and "--worker" in sys.argv:
    torch.set_num_threads(1)
    _two_process_fits(Path(sys.argv[sys.argv.index("--worker") + 1]))
