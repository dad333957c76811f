"""The fast paths of training give the plain paths' results: bf16 autocast, the fused optimiser,
sharded losses, and the fast minibatch-OT couplings (exact where promised, never worse by refinement)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from iterflow.core import distributed as ddp
from iterflow.core.couplings import (
    assignment,
    auto_chunk,
    chunked_assignment,
    couple,
    ot_permutation,
    refine_assignment,
    transport_cost,
)
from iterflow.core.nn import MLPVelocity, stacked_linear
from iterflow.errors import InputError
from iterflow.methods import METHODS
from iterflow.methods.fm import FMOptions, flow_matching_loss
from iterflow.train import TrainConfig, autocast_dtype, cpu_has_native_bf16, train
from iterflow.train.loop import make_optimizer

SMALL = dict(
    data="checkerboard",
    steps=100,
    batch_size=256,
    hidden=(64, 64),
    n_train=4000,
    n_val=100,
    n_test=100,
    log_every=10,
    checkpoint_every=1000,
    seed=3,
)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_bf16_autocast_tracks_full_precision_training(tmp_path: Path) -> None:
    full = train(TrainConfig(**SMALL, autocast="none"), tmp_path / "fp32")
    half = train(TrainConfig(**SMALL, autocast="bf16"), tmp_path / "bf16")
    assert full.history[0]["autocast"] == "none" and half.history[0]["autocast"] == "bfloat16"
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert a != b  # autocast really changed the arithmetic ...
    for x, y in zip(a, b):  # ... but the same batches give the same losses to bf16 accuracy
        assert abs(x - y) <= 2e-2 * abs(x)


def test_autocast_auto_resolution_and_validation() -> None:
    cpu = torch.device("cpu")
    fm = METHODS.get("fm")(FMOptions(), event_shape=(2,), num_blocks=1)
    auto = TrainConfig(autocast="auto")
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert autocast_dtype(auto, fm, cpu, torch.float32) == expected
    assert autocast_dtype(auto, fm, cpu, torch.float64) is None  # float64 runs stay exact
    assert autocast_dtype(TrainConfig(autocast="none"), fm, cpu, torch.float32) is None
    assert autocast_dtype(TrainConfig(autocast="bf16"), fm, cpu, torch.float32) == torch.bfloat16

    class Unmarked(type(fm)):  # methods not marked autocast_safe never get "auto" bf16
        autocast_safe = False

    unmarked = Unmarked(FMOptions(), event_shape=(2,), num_blocks=1)
    assert autocast_dtype(auto, unmarked, cpu, torch.float32) is None
    with pytest.raises(InputError, match="^autocast: "):
        TrainConfig(autocast="fp8")
    with pytest.raises(InputError, match="float32"):
        TrainConfig(autocast="bf16", dtype="float64")
    with pytest.raises(InputError, match="^compile: "):
        TrainConfig(compile="yes")  # type: ignore[arg-type]


def test_fused_optimizer_matches_the_reference_adam() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,), (2, 5)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(5)]
    runs = []
    for make in (
        lambda ps: make_optimizer([{"params": ps}], 1e-2, 0.0),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    ):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = make(ps)
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        runs.append(ps)
    assert runs[0][0].data.ne(init[0]).all()
    for p, q in zip(*runs):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)
    assert make_optimizer([{"params": [torch.nn.Parameter(init[0])]}], 1e-3, 0.0).defaults["fused"]


@pytest.mark.parametrize(
    ("dim", "time_freqs", "x_freqs", "classes"), [(1, 0, 0, 0), (2, 3, 0, 0), (5, 0, 4, 3)]
)
def test_first_layer_with_a_time_per_row_is_the_one_time_layer_row_by_row(
    dim: int, time_freqs: int, x_freqs: int, classes: int
) -> None:
    """Training's first layer (one product of ``[x, time features]``) equals the ODE path's (the
    time term computed once and broadcast) row by row, values and weight gradients alike."""
    torch.manual_seed(dim)
    net = MLPVelocity(
        dim, (16, 16), time_freqs=time_freqs, x_freqs=x_freqs, num_classes=classes
    ).double()
    x, t = torch.randn(7, dim, dtype=torch.float64), torch.rand(7, dtype=torch.float64)
    y = torch.randint(0, classes + 1, (7,)) if classes else None
    fused = net(x, t, y)
    rows = torch.cat(
        [net(x[i : i + 1], t[i], None if y is None else y[i : i + 1]) for i in range(7)]
    )
    assert torch.allclose(fused, rows, rtol=0, atol=1e-12)
    grads = [
        torch.autograd.grad(out.square().sum(), (net.inp.weight, net.inp_t.weight))
        for out in (fused, rows)
    ]
    for a, b in zip(*grads):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("ks", "bias", "rows"), [((1,), True, 9), ((3,), False, 1),
                                                  ((2, 9), True, 33), ((40, 1, 5), True, 6)])  # fmt: skip
def test_stacked_linear_is_the_sum_of_linear_layers(
    ks: tuple[int, ...], bias: bool, rows: int
) -> None:
    """Values and gradients (inputs, weights, bias) of :func:`stacked_linear` equal the sum of
    ``F.linear`` over the parts, float64."""
    g = torch.Generator().manual_seed(sum(ks) + rows)
    h = 6
    xs = [torch.randn(rows, k, generator=g, dtype=torch.float64, requires_grad=True) for k in ks]
    ws = [torch.randn(h, k, generator=g, dtype=torch.float64, requires_grad=True) for k in ks]
    b = torch.randn(h, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    up = torch.randn(rows, h, generator=g, dtype=torch.float64)
    ref = sum(F.linear(x, w) for x, w in zip(xs, ws)) + (b if b is not None else 0)
    out = stacked_linear(xs, ws, b)
    assert out.shape == (rows, h) and torch.allclose(out, ref, rtol=0, atol=1e-12)
    leaves = [*xs, *ws, *([b] if b is not None else [])]
    for a, c in zip(torch.autograd.grad((out * up).sum(), leaves, retain_graph=True),
                    torch.autograd.grad((ref * up).sum(), leaves)):  # fmt: skip
        assert a.shape == c.shape and torch.allclose(a, c, rtol=0, atol=1e-12)


@pytest.mark.parametrize("timed", ["none", "per-row", "one"])
def test_logit_net_input_layer_is_its_linear_layers(timed: str) -> None:
    """The transport app's LogitNet, whose input layer runs through :func:`stacked_linear`, gives
    what its ``nn.Linear`` layers applied in turn give (float64), with or without a time (one for
    all rows or one per row)."""
    from iterflow.apps.ot.classifiers import LogitNet

    torch.manual_seed(3)
    u = torch.randn(11, 3, dtype=torch.float64)
    net = LogitNet(3, hidden=(8, 5), time_conditioned=timed != "none", time_freqs=2).double()
    if timed == "none":
        ref, out = net.body(net.inp(u)).squeeze(-1), net(u)
    else:
        t = (
            torch.rand(11, dtype=torch.float64)
            if timed == "per-row"
            else torch.tensor(0.3).double()
        )
        tf = net.time(t.reshape(-1, 1))
        ref, out = net.body(net.inp(u) + net.inp_t(tf)).squeeze(-1), net(u, t)
    assert out.shape == (11,) and torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_sharded_loss_gradients_average_to_the_full_batch_gradient() -> None:
    net = MLPVelocity(2, hidden=(16, 16), time_freqs=2).double()
    data = torch.randn(37, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(ctx: ddp.DistContext | None) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(7)  # every rank draws the same global randomness
        noise = torch.randn(data.shape, generator=gen, dtype=data.dtype)
        with ddp.sharding(ctx):
            loss = flow_matching_loss(net, data, noise, FMOptions(coupling="ot", sigma=0.1), gen)
        return list(torch.autograd.grad(loss.value(ctx), list(net.parameters())))

    full = grads(None)
    ranks = [grads(ddp.DistContext(r, 3, r, "gloo")) for r in range(3)]
    for j, f in enumerate(full):
        assert torch.allclose(sum(r[j] for r in ranks) / 3, f, rtol=0, atol=1e-13)


def _problem(n: int, seed: int, d: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d) + 1.0
    return x0, torch.randn(n, d, generator=g, dtype=torch.float64)


def test_auto_ot_is_exact_on_small_batches() -> None:
    x0, x1 = _problem(7, 0)
    best = min(transport_cost(x0, x1[list(p)]) for p in itertools.permutations(range(7)))
    assert transport_cost(x0, x1[ot_permutation(x0, x1)]) == pytest.approx(best, rel=1e-12)
    x0, x1 = _problem(100, 1)
    exact = transport_cost(x0, x1[assignment(x0, x1, "emd")])
    assert transport_cost(x0, x1[ot_permutation(x0, x1)]) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("d", [2, 5])
def test_fast_ot_pairs_are_permutations_close_to_the_exact_cost(d: int) -> None:
    x0, x1 = _problem(600, 2, d)  # 600 rows: chunks of uneven size
    exact = transport_cost(x0, x1[assignment(x0, x1, "emd")])
    auto = ot_permutation(x0, x1)
    assert sorted(auto.tolist()) == list(range(600))
    chunk = auto_chunk(600)
    random_chunks = chunked_assignment(x0, x1, chunk, "lsa")
    stratified = chunked_assignment(x0, x1, chunk, "lsa", stratify=True)
    assert sorted(stratified.tolist()) == list(range(600))
    costs = [transport_cost(x0, x1[p]) for p in (random_chunks, stratified, auto)]
    assert exact <= costs[2] <= costs[1]  # auto = stratified chunks + refinement, which never hurts
    if d == 2:  # in 2-D stratified chunks are even subsamples: a fraction of the excess cost
        assert costs[1] - exact < 0.5 * (costs[0] - exact)
    assert costs[2] <= 1.5 * exact
    a, b = couple(x0, x1, "ot")
    assert torch.equal(a, x0) and torch.equal(b.sort(0).values, x1.sort(0).values)


def test_refinement_never_increases_the_transport_cost() -> None:
    x0, x1 = _problem(257, 3)
    perm = torch.randperm(257, generator=torch.Generator().manual_seed(0))
    costs = [transport_cost(x0, x1[perm])]
    for _ in range(4):
        perm = refine_assignment(x0, x1, perm, 1)
        assert sorted(perm.tolist()) == list(range(257))
        costs.append(transport_cost(x0, x1[perm]))
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
    assert costs[-1] < 0.9 * costs[0]  # and it does improve a random pairing
    assert torch.equal(refine_assignment(x0, x1, perm, 0), perm)
    with pytest.raises(InputError, match="ot_refine"):
        refine_assignment(x0, x1, perm, -1)
    with pytest.raises(InputError, match="ot_solver"):
        FMOptions(ot_solver="hungarian")


@pytest.mark.slow
def test_compiled_training_gives_the_eager_model(tmp_path: Path) -> None:
    tiny = dict(
        data="8gaussians",
        steps=20,
        batch_size=64,
        hidden=(16, 16),
        n_train=500,
        n_val=50,
        n_test=50,
        log_every=10,
        dtype="float64",
    )
    eager = train(TrainConfig(**tiny), tmp_path / "eager").flow
    compiled = train(TrainConfig(**tiny, compile=True), tmp_path / "compiled").flow
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    # compile may change between resumptions of one run: it is not part of the config's identity
    train(TrainConfig(**tiny, compile=True), tmp_path / "eager")
