"""Flow-based optimal transport against closed forms between Gaussians, run folders and the CLI.

Between ``N(m1, S1)`` and ``N(m2, S2)`` the optimal map is linear, ``T(x) = m2 + A (x - m1)`` with
``A = S1^{-1/2} (S1^{1/2} S2 S1^{1/2})^{1/2} S1^{-1/2}``, and
``W2^2 = |m1 - m2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from iterflow.apps.ot import (
    TransportOptions,
    fit_transport,
    gaussian_ot_flow,
    gaussian_ot_map,
    gaussian_w2_sq,
    kinetic_energy,
    load_transport,
    save_transport,
    transport_cost,
)
from iterflow.apps.ot.transport import build_classifiers, build_transport_flow
from iterflow.core import couplings
from iterflow.core.couplings import _compiled_available
from iterflow.data import GaussianMixture
from iterflow.errors import InputError
from iterflow.methods.transport import joint_loss, kl_classifier_loss, relaxed_ot_loss
from iterflow.train import ResumeWarning, StepBudget

F64 = torch.float64
M1, M2 = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([2.0, 1.0], dtype=F64)
S1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
S2 = torch.tensor([[0.4, -0.1], [-0.1, 1.5]], dtype=F64)


def gaussian_samples(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p, q = GaussianMixture(M1[None], S1[None]), GaussianMixture(M2[None], S2[None])
    return p.sample(n, g), q.sample(n, g)


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------


def test_gaussian_ot_map_pushes_s1_to_s2_and_its_cost_is_w2() -> None:
    a, c = gaussian_ot_map(M1, S1, M2, S2)
    assert torch.allclose(a, a.T, atol=1e-12)
    assert bool((torch.linalg.eigvalsh(a) > 0).all())  # the gradient of a convex potential
    assert torch.allclose(a @ S1 @ a.T, S2, atol=1e-12)
    assert torch.allclose(a @ M1 + c, M2, atol=1e-12)
    eye = torch.eye(2, dtype=F64)
    cost = (a @ M1 + c - M1).pow(2).sum() + torch.trace((a - eye) @ S1 @ (a - eye).T)
    assert math.isclose(float(cost), gaussian_w2_sq(M1, S1, M2, S2), rel_tol=1e-12)


def test_gaussian_w2_reduces_to_the_one_dimensional_formula() -> None:
    for m1, s1, m2, s2 in [(0.0, 1.0, 3.0, 2.0), (-1.0, 0.5, 0.5, 0.5)]:
        got = gaussian_w2_sq(
            torch.tensor([m1]), torch.tensor([[s1**2]]), torch.tensor([m2]), torch.tensor([[s2**2]])
        )
        assert math.isclose(got, (m1 - m2) ** 2 + (s1 - s2) ** 2, rel_tol=1e-12)


@pytest.mark.parametrize("blocks", [1, 3])
def test_exact_flow_maps_and_kinetic_energy(blocks: int) -> None:
    """On the exact OT flow every path is straight at constant speed: kinetic energy =
    displacement."""
    flow = gaussian_ot_flow(M1, S1, M2, S2, blocks=blocks)
    a, c = gaussian_ot_map(M1, S1, M2, S2)
    x, y = (v.double() for v in gaussian_samples(4000, seed=0))
    tx = x @ a.T + c
    with torch.no_grad():
        assert torch.allclose(flow.encode(x, solver="rk4", steps=8), tx, atol=1e-10)
        ke = kinetic_energy(flow, x, steps=8)
        ke_odd = kinetic_energy(flow, x, steps=7)
    assert torch.allclose(ke, (tx - x).pow(2).sum(1), atol=1e-10)
    assert torch.allclose(ke_odd, ke, atol=1e-10)
    cost = transport_cost(flow, x, y, steps=8)
    assert math.isclose(cost.kinetic_forward, cost.displacement_forward, rel_tol=1e-9)
    # the Monte Carlo mean of the exact cost approaches the closed form
    se = float((tx - x).pow(2).sum(1).std()) / math.sqrt(len(x))
    assert abs(cost.w2_sq - gaussian_w2_sq(M1, S1, M2, S2)) < 5 * se + 0.05


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

FAST = TransportOptions(blocks=2, hidden=(64, 64), init_steps=500, ot_chunk=128)  # the defaults'
# phases (flow matching on minibatch-OT pairs, then one reflow; no refinement) on a smaller budget


@pytest.fixture(scope="module")
def fitted() -> tuple:
    x, y = gaussian_samples(20_000, seed=0)
    res = fit_transport(x, y, FAST, generator=torch.Generator().manual_seed(0))
    return res, x, y


def test_transport_cost_and_map_match_the_closed_form(fitted: tuple) -> None:
    res, x, y = fitted
    exact = gaussian_w2_sq(M1, S1, M2, S2)
    assert abs(res.w2_sq / exact - 1) < 0.05, (res.w2_sq, exact)
    # also against the closed form of the samples' own Gaussian fits (no sampling error of P, Q)
    plug_in = gaussian_w2_sq(
        x.double().mean(0), torch.cov(x.double().T), y.double().mean(0), torch.cov(y.double().T)
    )
    assert abs(res.w2_sq / plug_in - 1) < 0.05
    a, c = gaussian_ot_map(M1, S1, M2, S2)
    xt, yt = gaussian_samples(2000, seed=1)
    err = (res.forward(xt).double() - (xt.double() @ a.T + c)).pow(2).sum(1).mean().sqrt()
    assert float(err) < 0.1 * math.sqrt(exact), float(err)
    back = res.backward(yt).double()
    err_back = (back - torch.linalg.solve(a, (yt.double() - c).T).T).pow(2).sum(1).mean().sqrt()
    assert float(err_back) < 0.1 * math.sqrt(exact), float(err_back)
    roundtrip = res.backward(res.forward(xt)) - xt
    assert float(roundtrip.abs().max()) < 1e-2
    assert [h["phase"] for h in res.history] == ["init"]
    assert res.history[0]["straighten"]["steps"] == 125  # straighten = 0.25 of init_steps
    # the reflow leaves straight constant-speed paths: kinetic energy = displacement
    kinetic_gap = res.cost.kinetic_forward - res.cost.displacement_forward
    assert 0 <= kinetic_gap < 0.005 * exact, kinetic_gap


def test_save_load_round_trip(fitted: tuple, tmp_path: Path) -> None:
    res, x, _ = fitted
    save_transport(res, tmp_path / "run", {"data": {"note": "test"}})
    back = load_transport(tmp_path / "run")
    assert back.options == res.options and back.cost == res.cost
    assert torch.equal(back.forward(x[:50]), res.forward(x[:50]))
    meta = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert meta["data"] == {"note": "test"} and meta["kind"] == "transport"


def test_load_transport_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run"):
        load_transport(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "transport.json").write_text('{"kind": "something else"}')
    with pytest.raises(InputError, match="transport run"):
        load_transport(tmp_path / "other")


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"blocks": 0}, "blocks"),
        ({"coupling": "nope"}, "coupling"),
        ({"solver": "dopri5"}, "solver"),
        ({"hidden": ()}, "hidden"),
        ({"ema": 1.0}, "ema"),
        ({"init_steps": 0, "refine_steps": 0}, "init_steps"),
    ],
)
def test_options_are_validated(kwargs: dict, argument: str) -> None:
    with pytest.raises(InputError, match=argument):
        TransportOptions(**kwargs)


def test_fit_transport_rejects_bad_samples() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2)
    with pytest.raises(InputError, match="target"):
        fit_transport(x, torch.randn(50, 3), generator=g)
    with pytest.raises(InputError, match="source"):
        fit_transport(x.numpy(), x, generator=g)  # type: ignore[arg-type]
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(InputError, match="finite"):
        fit_transport(x, bad, generator=g)


# ------------------------------------------------------------------------------------------------
# end-point diagnostics
# ------------------------------------------------------------------------------------------------


def gaussian_kl(m1: torch.Tensor, s1: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor) -> float:
    """``KL(N(m1, S1) || N(m2, S2))`` in closed form."""
    inv = torch.linalg.inv(s2)
    dm = m2 - m1
    logdet = torch.logdet(s2) - torch.logdet(s1)
    return float(0.5 * (torch.trace(inv @ s1) + dm @ inv @ dm - len(m1) + logdet))


@pytest.mark.parametrize("dim", [2, 5])
def test_endpoint_diagnostics_tell_the_exact_map_from_no_map(dim: int) -> None:
    """On random Gaussian pairs: the exact OT map gives KLs near 0 and MMDs near 0; the identity
    (an untrained flow) gives the closed-form KL(P || Q) and KL(Q || P) and the untransported MMD."""
    from iterflow.apps.ot import ClassifierOptions, TransportMap
    from iterflow.apps.ot.diagnostics import DiagnosticOptions, endpoint_diagnostics
    from iterflow.core.ode import SolverSpec

    g = torch.Generator().manual_seed(10 + dim)
    rot = [torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64))[0] for _ in range(2)]
    ev = [0.4 + torch.rand(dim, generator=g, dtype=F64) for _ in range(2)]
    s1, s2 = ((q * e) @ q.T for q, e in zip(rot, ev))
    m1, m2 = torch.zeros(dim, dtype=F64), 0.7 * torch.randn(dim, generator=g, dtype=F64)
    p, q = GaussianMixture(m1[None], s1[None]), GaussianMixture(m2[None], s2[None])
    train, test = (p.sample(6000, g), q.sample(6000, g)), (p.sample(3000, g), q.sample(3000, g))
    flow = gaussian_ot_flow(m1, s1, m2, s2)
    spec = SolverSpec("rk4", 8)
    opts = DiagnosticOptions(ClassifierOptions(hidden=(32, 32), steps=500, batch_size=256))
    exact = endpoint_diagnostics(TransportMap(flow, "forward", spec),
                                 TransportMap(flow, "backward", spec), train, test, opts,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    none = endpoint_diagnostics(lambda x: x, lambda y: y, train, test, opts,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    kl_pq, kl_qp = gaussian_kl(m1, s1, m2, s2), gaussian_kl(m2, s2, m1, s1)
    assert min(kl_pq, kl_qp) > 0.5  # the pair is far from equal: the checks below can fail
    assert abs(none["kl_pushed_to_target"] / kl_pq - 1) < 0.15, (none, kl_pq)
    assert abs(none["kl_pulled_to_source"] / kl_qp - 1) < 0.15, (none, kl_qp)
    for key in ("kl_pushed_to_target", "kl_pulled_to_source"):
        assert abs(exact[key]) < 0.05, (key, exact[key])
    assert none["mmd_pushed_to_target"] == pytest.approx(none["mmd_source_to_target"])
    for key in ("mmd_pushed_to_target", "mmd_pulled_to_source"):
        assert abs(exact[key]) < 0.02 * none["mmd_source_to_target"], (key, exact[key])
    assert exact["n_test"] == 2000  # DiagnosticOptions.max_test rows per side


# ------------------------------------------------------------------------------------------------
# the objective on the one loop, and resumption
# ------------------------------------------------------------------------------------------------

TINY = TransportOptions(
    blocks=2,
    hidden=(16,),
    batch_size=32,
    init_steps=12,
    ot_chunk=16,
    refine_steps=8,
    classifier_hidden=(8,),
    classifier_batch_size=48,
    classifier_warmup=5,
    eval_steps=4,
)


def test_each_part_of_the_joint_step_gets_only_its_own_gradient() -> None:
    """The classifiers' loss moves particles without gradients; the relaxed objective uses frozen
    classifiers: one backward pass of their sum gives each part exactly its own gradient."""
    x, y = (v.double() for v in gaussian_samples(64, seed=3))
    g = torch.Generator().manual_seed(0)
    flow = build_transport_flow(2, torch.zeros(2), torch.ones(2), TINY, g).double()
    clf = build_classifiers(2, TINY, g).double()
    obj = TINY.objective()
    fp, cp = list(flow.parameters()), list(clf.parameters())
    for loss, reaches, spared in (
        (kl_classifier_loss(clf, flow, x, y, obj.spec()), cp, fp),
        (relaxed_ot_loss(flow, clf, x[:32], y[:32], obj), fp, cp),
    ):
        grads = torch.autograd.grad(loss.value(), reaches + spared, allow_unused=True)
        assert all(gr is not None and bool(gr.abs().sum() > 0) for gr in grads[: len(reaches)])
        assert all(gr is None for gr in grads[len(reaches) :])
    joint = joint_loss(flow, clf, (x[:32], y[:32], x, y), obj)
    parts = (
        relaxed_ot_loss(flow, clf, x[:32], y[:32], obj).value()
        + kl_classifier_loss(clf, flow, x, y, obj.spec()).value()
    )
    assert torch.allclose(joint.value(), parts, rtol=1e-12)
    assert set(joint.terms) == {"kinetic", "kl_fwd", "kl_bwd", "logistic"}


def _flow_state(res: object) -> dict[str, torch.Tensor]:
    return res.flow.state_dict()  # type: ignore[attr-defined]


@pytest.mark.skipif(not _compiled_available(), reason="needs numba (the compiled pairing)")
def test_a_fit_resumed_with_the_other_ot_pairing_is_warned(tmp_path: Path, monkeypatch) -> None:
    """The init phase pairs 2-D batches of 256 on the whole batch (``ot_chunk=0``) with the compiled
    pairing; resumed as if numba had gone since, the fit says so and still finishes."""
    x, y = (v.double() for v in gaussian_samples(600, seed=2))
    opts = dataclasses.replace(TINY, batch_size=256, ot_chunk=0)
    run = {"generator": torch.Generator().manual_seed(0), "folder": tmp_path / "run",
           "checkpoint_every": 3, "eval_points": 300}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        fit_transport(x, y, opts, **run, budget=StepBudget(5))
    monkeypatch.setattr(couplings, "USE_COMPILED", False)
    run["generator"] = torch.Generator().manual_seed(0)
    with pytest.warns(ResumeWarning, match="ot_pairing 'compiled' then, 'numpy' now"):
        res = fit_transport(x, y, opts, **run)
    assert [h["phase"] for h in res.history] == ["init", "refine"]


@pytest.mark.parametrize("stops", [(5,), (14, 3), (19, 2, 4)])
def test_interrupted_fit_resumes_to_the_uninterrupted_result(
    stops: tuple[int, ...], tmp_path: Path
) -> None:
    """Interrupted (after a checkpoint, mid-phase, in each phase) and run again, ``fit_transport``
    gives the uninterrupted flow tensor for tensor (float64 on the CPU)."""
    x, y = (v.double() for v in gaussian_samples(400, seed=2))
    whole = fit_transport(x, y, TINY, generator=torch.Generator().manual_seed(0), eval_points=300)
    folder = tmp_path / "run"
    for k in stops:
        with pytest.raises(KeyboardInterrupt):
            fit_transport(x, y, TINY, generator=torch.Generator().manual_seed(0), folder=folder,
                          checkpoint_every=3, budget=StepBudget(k), eval_points=300)  # fmt: skip
    res = fit_transport(x, y, TINY, generator=torch.Generator().manual_seed(0), folder=folder,
                        checkpoint_every=3, eval_points=300)  # fmt: skip
    for (name, a), b in zip(_flow_state(whole).items(), _flow_state(res).values()):
        assert torch.equal(a, b), name
    assert res.cost == whole.cost
    assert [h["phase"] for h in res.history] == ["init", "refine"]
    back = load_transport(folder)  # a finished folder loads, and a re-run returns it
    again = fit_transport(x, y, TINY, generator=torch.Generator().manual_seed(0), folder=folder,
                          eval_points=300)  # fmt: skip
    for a, b, c in zip(_flow_state(whole).values(), _flow_state(back).values(),
                       _flow_state(again).values()):  # fmt: skip
        assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(InputError, match="folder: holds a transport run with another config"):
        fit_transport(x, y, TINY, generator=torch.Generator().manual_seed(1), folder=folder)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def cli_main(argv: list[str]) -> int:
    from iterflow.cli import main

    return main(argv)


def test_cli_transport_and_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code = cli_main(
        [
            "transport",
            "--source",
            "gmm-2d",
            "--target",
            "8gaussians",
            "--out",
            str(run),
            "--n-train",
            "2000",
            "--n-test",
            "300",
            "--hidden",
            "32,32",
            "--init-steps",
            "60",
            "--refine-steps",
            "10",
            "-o",
            "classifier_warmup=10",
            "-o",
            "ot_chunk=128",
            "--ratio-steps",
            "40",
            "--intervals",
            "4",
            "--quiet",
        ]
    )
    assert code == 0
    for name in (
        "manifest.json",
        "metrics.json",
        "normalization.safetensors",
        "blocks/block_000.safetensors",
        "blocks/block_001.safetensors",
        "ratio/telescopic/manifest.json",
        "plots/trajectories.png",
        "plots/transport.png",
        "plots/log_ratio.png",
    ):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("w2_sq", "w2_exact_test", "log_ratio_mse_source", "log_ratio_mse_target"):
        assert math.isfinite(metrics[key]), key
    endpoint_keys = ("kl_pushed_to_target", "kl_pulled_to_source", "mmd_pushed_to_target",
                     "mmd_pulled_to_source", "mmd_source_to_target")  # fmt: skip
    ratio_keys = ("log_mean_ratio_source", "log_mean_inverse_target", "kl_source_target")
    for key in endpoint_keys + ratio_keys:
        assert math.isfinite(metrics[key]), key
    assert metrics["n_test"] == 300 and "KL(T#P||Q)" in metrics["endpoint_summary"]
    capsys.readouterr()
    assert cli_main(["info", str(run)]) == 0  # `iterflow info` reads transport folders too
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert shown["kind"] == "transport" and shown["metrics"]["w2_sq"] == metrics["w2_sq"]
    assert shown["endpoints"]["kl_pushed_to_target"] == metrics["kl_pushed_to_target"]
    assert metrics["endpoint_summary"] in err  # and a readable line
    # `iterflow eval` on the run and on its telescopic estimator: the end-point diagnostics anew
    assert cli_main(["eval", str(run), "--json", "--n", "200"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["kind"] == "transport" and m["n_test"] == 200
    assert all(math.isfinite(m[k]) for k in endpoint_keys)
    assert cli_main(["eval", str(run / "ratio" / "telescopic"), "--n", "200"]) == 0
    shown_text = capsys.readouterr().out
    assert "normalisation" in shown_text and "KL(T#P||Q)" in shown_text
    assert cli_main(["info", str(run / "ratio" / "telescopic")]) == 0
    assert json.loads(capsys.readouterr().out)["endpoints"]["n_test"] == 300
    pts = tmp_path / "pts.npy"
    np.save(pts, np.array([[0.0, 0.0], [2.0, 1.0], [-2.0, -1.5], [0.0, 2.0]]))
    capsys.readouterr()
    assert cli_main(["ratio", str(run), "--points", str(pts), "--quiet"]) == 0
    printed = [float(v) for v in capsys.readouterr().out.split()]
    out = tmp_path / "lr.npy"
    assert cli_main(["ratio", str(run), "--points", str(pts), "--out", str(out), "--quiet"]) == 0
    assert np.allclose(np.load(out), printed, rtol=1e-5)
    # a baseline is fitted on first use and cached in the run folder
    assert cli_main(["ratio", str(run), "--points", str(pts), "--estimator", "kde", "--quiet"]) == 0
    assert (run / "ratio" / "kde" / "manifest.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["transport", "--source", "nope", "--target", "8gaussians"], "--source"),
        (["transport", "--source", "gmm-2d", "--target", "sklearn:wine"], "--target"),
        (["transport", "--source", "gmm-2d", "--target", "8gaussians", "-o", "gamma=-1"], "gamma"),
        (["transport", "--source", "gmm-2d", "--target", "8gaussians", "-o", "nope=1"], "nope"),
        (
            ["transport", "--source", "gmm-2d", "--target", "8gaussians", "--intervals", "3"],
            "--intervals",
        ),
        (["ratio", "RUN_MISSING", "--points", "x.npy"], "run"),
    ],
)
def test_cli_bad_input_exits_2(
    args: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("RUN_MISSING", str(tmp_path / "missing")) for a in args]
    if argv[0] == "transport":
        argv += ["--out", str(tmp_path / "out"), "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


TINY_CLI = [
    "transport", "--source", "gmm-2d", "--target", "8gaussians", "--n-train", "400",
    "--n-test", "100", "--hidden", "16", "--init-steps", "12", "--refine-steps", "6",
    "--batch-size", "32", "-o", "classifier_warmup=4", "-o", "classifier_batch_size=48",
    "-o", "classifier_hidden=8", "-o", "ot_chunk=16", "-o", "eval_steps=4",
    "--ratio-steps", "9", "--intervals", "2", "--checkpoint-every", "3", "--dtype", "float64",
    "--quiet",
]  # fmt: skip


def test_cli_transport_resumes_a_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iterflow transport` stopped (exit 130) in the flow-matching phase, then in the telescopic
    classifier, and run again gives the uninterrupted run's tensors; a finished folder re-runs,
    another config or a newer format is refused (exit 2)."""
    from iterflow.apps.ot import telescopic, transport
    from iterflow.io import load_tensors

    whole, part = tmp_path / "whole", tmp_path / "part"
    assert cli_main([*TINY_CLI, "--out", str(whole)]) == 0
    for steps in (7, 20):  # 12 + 4 + 6 transport steps, then 9 of the telescopic classifier
        budget = StepBudget(steps)
        monkeypatch.setattr(transport, "StepBudget", lambda _, b=budget: b)
        monkeypatch.setattr(telescopic, "StepBudget", lambda _, b=budget: b)
        assert cli_main([*TINY_CLI, "--out", str(part)]) == 130
    monkeypatch.undo()
    assert not (part / "ratio" / "telescopic" / "manifest.json").exists()
    assert cli_main([*TINY_CLI, "--out", str(part)]) == 0
    for name in ("blocks/block_000.safetensors", "blocks/block_001.safetensors",
                 "ratio/telescopic/ratio.safetensors"):  # fmt: skip
        a, b = load_tensors(whole / name), load_tensors(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    meta = json.loads((part / "manifest.json").read_text())
    assert meta["kind"] == "transport" and meta["dtype"] == "float64" and meta["complete"]
    assert not (part / "progress.json").exists() and not (part / "phases").exists()
    assert cli_main([*TINY_CLI, "--out", str(part)]) == 0  # a finished run: loaded, re-reported
    capsys.readouterr()
    assert cli_main([*TINY_CLI, "--out", str(part), "--init-steps", "13"]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "another configuration" in err, err
    meta["format_version"] = 99
    (part / "manifest.json").write_text(json.dumps(meta))
    pts = tmp_path / "pts.npy"
    np.save(pts, np.zeros((2, 2)))
    for argv, needle in (
        ([*TINY_CLI, "--out", str(part)], "--out"),
        (["ratio", str(part), "--points", str(pts), "--quiet"], "run"),
        (["info", str(part)], "run"),
    ):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "newer" in err[0], err
