"""The one optimisation loop (iterflow.train.loop): reduction, schedule, EMA, checkpoints, errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from iterflow.core import distributed as ddp
from iterflow.errors import InputError
from iterflow.methods.base import Loss
from iterflow.methods.classifier import cross_entropy_loss, logistic_loss
from iterflow.train.loop import (
    AdamStep,
    Checkpoint,
    OptimConfig,
    StepBudget,
    clip_gradients,
    cosine_lr,
    make_optimizer,
    optimize,
)

DT = torch.float64


def _regression(seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 3, generator=g, dtype=DT)
    w = torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT)
    y = x @ w + 0.3
    torch.manual_seed(seed)
    return nn.Linear(3, 1).to(DT), (x, y)


def _mse(module: nn.Module):  # noqa: ANN202
    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        x, y = batch
        n = x.shape[0]
        rows = ddp.local_rows(n)
        r = (module(x[rows]) - y[rows]).pow(2).sum(1)
        return Loss(r, n, {"mse": r.detach()})

    return loss_fn


def test_the_loop_fits_a_least_squares_problem_to_its_closed_form() -> None:
    net, data = _regression()
    cfg = OptimConfig(steps=1500, batch_size=64, lr=0.05, lr_schedule="constant", grad_clip=0)
    rec = optimize(net, _mse(net), data, cfg, generator=torch.Generator().manual_seed(1))
    x, y = data
    a = torch.cat([x, torch.ones(len(x), 1, dtype=DT)], 1)
    exact = torch.linalg.lstsq(a, y).solution.squeeze(1)
    got = torch.cat([net.weight.detach().squeeze(0), net.bias.detach()])
    assert torch.allclose(got, exact, atol=5e-3), (got, exact)
    assert rec["steps"] == 1500 and rec["final_mse"] < 1e-4
    assert set(rec) >= {"seconds_optimize", "seconds_before_resume", "mean_loss", "world_size"}


def test_row_mean_shards_average_to_the_global_mean() -> None:
    rows = torch.randn(10, dtype=DT)
    shares = []
    for r in range(3):
        ctx = ddp.DistContext(r, 3, r, "gloo")
        lo, hi = ctx.bounds(10)
        shares.append(ddp.row_mean(rows[lo:hi], 10, ctx))
    assert torch.allclose(sum(shares) / 3, rows.mean(), atol=1e-14)
    assert torch.equal(ddp.row_mean(rows, 10, None), rows.mean())


def test_loss_sum_and_scaling_keep_the_rows() -> None:
    a = Loss(torch.tensor([1.0, 3.0]), 2, {"a": torch.tensor([1.0, 3.0])})
    b = Loss(torch.tensor([2.0, 2.0]), 2, {"b": torch.tensor([2.0, 2.0])}, extra=torch.tensor(0.5))
    c = a + b.scaled(2.0)
    assert float(c.value()) == pytest.approx(2.0 + 4.0 + 1.0)
    assert set(c.terms) == {"a", "b"}


def test_interrupted_training_resumes_bit_for_bit(tmp_path: Path) -> None:
    cfg = OptimConfig(steps=60, batch_size=32, lr=0.02, ema=0.9, checkpoint_every=10, log_every=5)

    def run(folder: Path, stop: int | None) -> nn.Module:
        net, data = _regression(3)
        optimize(net, _mse(net), data, cfg, generator=torch.Generator().manual_seed(4),
                 checkpoint=Checkpoint(folder, "fit"), budget=StepBudget(stop))  # fmt: skip
        return net

    ref = run(tmp_path / "ref", None)
    (tmp_path / "cut").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", 37)  # killed after step 37; the last checkpoint is step 30
    resumed = run(tmp_path / "cut", None)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    log = Checkpoint(tmp_path / "cut", "fit").read_log()
    assert [r["step"] for r in log] == list(range(5, 61, 5))  # no duplicate rows after the resume


def test_another_key_starts_fresh(tmp_path: Path) -> None:
    cfg = OptimConfig(steps=20, batch_size=32, lr=0.02, checkpoint_every=10)
    net, data = _regression()
    with pytest.raises(KeyboardInterrupt):
        optimize(net, _mse(net), data, cfg, generator=torch.Generator().manual_seed(0),
                 checkpoint=Checkpoint(tmp_path, "a"), budget=StepBudget(15))  # fmt: skip
    net2, _ = _regression()
    rec = optimize(net2, _mse(net2), data, cfg, generator=torch.Generator().manual_seed(0),
                   checkpoint=Checkpoint(tmp_path, "b"))  # fmt: skip
    assert rec["seconds_before_resume"] == 0.0


def test_ema_ends_in_the_module_and_lr_scales_make_groups() -> None:
    net = nn.ModuleDict({"fast": nn.Linear(2, 1), "slow": nn.Linear(2, 1)}).to(DT)
    x = torch.randn(64, 2, dtype=DT)

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        (xb,) = batch
        r = (net["fast"](xb) + net["slow"](xb)).pow(2).squeeze(1)
        return Loss(r, xb.shape[0])

    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    cfg = OptimConfig(steps=5, batch_size=16, lr=1e-2, lr_schedule="constant", grad_clip=0)
    optimize(net, loss_fn, (x,), cfg, generator=torch.Generator().manual_seed(0),
             lr_scales={"slow.": 0.0})  # fmt: skip
    assert torch.equal(net["slow"].weight, before["slow.weight"])  # a zero factor freezes it
    assert not torch.equal(net["fast"].weight, before["fast.weight"])


def test_non_finite_loss_names_the_learning_rate() -> None:
    net = nn.Linear(2, 1).to(DT)
    x = torch.randn(8, 2, dtype=DT)

    def loss_fn(batch: tuple[Tensor, ...], gen: torch.Generator) -> Loss:
        return Loss(net(batch[0]).squeeze(1) * math.inf, batch[0].shape[0])

    with pytest.raises(FloatingPointError, match="learning rate"):
        optimize(net, loss_fn, (x,), OptimConfig(steps=3, batch_size=4, lr=1e-3, log_every=1),
                 generator=torch.Generator().manual_seed(0))  # fmt: skip


@pytest.mark.parametrize(
    "bad", [dict(steps=0), dict(lr=-1.0), dict(ema=1.0), dict(lr_schedule="step"), dict(warmup=-1)]
)
def test_bad_settings_name_the_argument(bad: dict) -> None:
    with pytest.raises(InputError) as err:
        OptimConfig(**{"steps": 10, "batch_size": 4, "lr": 1e-3, **bad})
    assert err.value.argument == next(iter(bad))


def test_mismatched_data_is_refused() -> None:
    net = nn.Linear(2, 1)
    cfg = OptimConfig(steps=1, batch_size=4, lr=1e-3)
    with pytest.raises(InputError, match="same number of rows"):
        optimize(net, _mse(net), (torch.zeros(4, 2), torch.zeros(5, 1)), cfg,
                 generator=torch.Generator())  # fmt: skip


def test_cosine_schedule_warms_up_then_decays_to_five_percent() -> None:
    lrs = [cosine_lr(1.0, s, 1000) for s in range(1000)]
    assert lrs[0] == pytest.approx(0.01) and lrs[99] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[99:], lrs[100:]))
    assert lrs[-1] == pytest.approx(0.05, abs=1e-5)
    assert cosine_lr(1.0, 0, 100, warmup=0) == pytest.approx(1.0)


def test_classification_losses_reach_their_optima() -> None:
    # cross-entropy of logits equal to log class frequencies is the entropy of the labels
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.log(torch.tensor([[0.75, 0.25]], dtype=DT)).expand(4, 2)
    ce = cross_entropy_loss(lambda x: logits, torch.zeros(4, 1, dtype=DT), labels)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(ce.value()) == pytest.approx(entropy, abs=1e-12)
    # the logistic loss is minimised by phi = log f1/f0: for equal samples, phi = 0
    x = torch.randn(32, 2, dtype=DT)
    phi = torch.zeros(1, dtype=DT, requires_grad=True)
    lo = logistic_loss(lambda z: phi.expand(z.shape[0]), x, x)
    (g,) = torch.autograd.grad(lo.value(), phi)
    assert abs(float(g)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 0.3, 1.0, 50.0, float("nan"), float("inf")])
def test_clip_gradients_matches_the_library_bit_for_bit(dtype: torch.dtype, scale: float) -> None:
    """The CPU path of clip_gradients against torch.nn.utils.clip_grad_norm_: the same gradients
    to the bit, below, near and above the bound, with non-finite gradients and a parameter
    without a gradient; mixed dtypes take the library's path."""
    g = torch.Generator().manual_seed(int(1e3 * (scale if math.isfinite(scale) else 7)))
    shapes = [(256, 3), (256,), (64, 256), (256,), (2, 64), (2,), (5,)]
    for max_norm in (0.5, 1.0, 3.0):
        ps = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        qs = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        for i, (p, q) in enumerate(zip(ps, qs)):
            if i == len(shapes) - 1:
                continue  # no gradient
            grad = torch.randn(p.shape, generator=g, dtype=dtype) * 0.05
            if i == 2:
                grad[0, 0] = scale  # sets the norm's magnitude (or makes it non-finite)
            p.grad, q.grad = grad.clone(), grad.clone()
        clip_gradients(ps, max_norm)
        torch.nn.utils.clip_grad_norm_(qs, max_norm)
        for p, q in zip(ps, qs):
            if q.grad is None:
                assert p.grad is None
            else:
                assert torch.equal(
                    p.grad.view(-1).view(torch.uint8), q.grad.view(-1).view(torch.uint8)
                )
        norm = torch.linalg.vector_norm(
            torch.cat([q.grad.flatten() for q in qs if q.grad is not None])
        )
        if math.isfinite(scale):
            assert float(norm) <= max_norm * (1 + 1e-5)
    mixed = [
        torch.ones(3, dtype=torch.float32, requires_grad=True),
        torch.ones(3, dtype=torch.float64, requires_grad=True),
    ]
    for p in mixed:
        p.grad = torch.full((3,), 10.0, dtype=p.dtype)
    clip_gradients(mixed, 1.0)
    assert abs(math.sqrt(sum(float(p.grad.pow(2).sum()) for p in mixed)) - 1.0) < 1e-5


def _bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_step_matches_the_optimizers_step_bit_for_bit(
    dtype: torch.dtype, weight_decay: float
) -> None:
    """AdamStep against opt.step() on twin parameter sets: Adam and AdamW, two groups with their
    own learning rates changed every step, a parameter without a gradient in one step (the
    fallback), and a load_state_dict in the middle (new state tensors): parameters and state equal
    to the bit after every step."""
    g = torch.Generator().manual_seed(3 + int(10 * weight_decay))
    shapes = [(7, 5), (5,), (3, 7), (3,)]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ps = [t.clone().requires_grad_() for t in init]
    qs = [t.clone().requires_grad_() for t in init]

    def groups(xs: list[Tensor]) -> list[dict]:
        return [{"params": xs[:2], "lr_scale": 1.0}, {"params": xs[2:], "lr_scale": 3.0}]

    opt_p = make_optimizer(groups(ps), 1e-2, weight_decay)
    opt_q = make_optimizer(groups(qs), 1e-2, weight_decay)
    assert opt_p.defaults["fused"]
    step = AdamStep(opt_p)
    if "decoupled_weight_decay" in opt_p.param_groups[0]:  # a PyTorch with the functional path
        assert step.direct
    for k in range(8):
        for gp, gq in zip(opt_p.param_groups, opt_q.param_groups):
            gp["lr"] = gq["lr"] = 1e-2 * gp["lr_scale"] / (1 + k)
        for i, (p, q) in enumerate(zip(ps, qs)):
            if k == 4 and i == 1:
                p.grad = q.grad = None  # no gradient this step: opt.step() skips it
                continue
            grad = torch.randn(p.shape, generator=g, dtype=dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        step()
        opt_q.step()
        if k == 5:
            opt_p.load_state_dict(copy.deepcopy(opt_q.state_dict()))  # new tensors, equal values
        for p, q in zip(ps, qs):
            assert torch.equal(_bits(p), _bits(q)), (k, p.shape)
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(_bits(opt_p.state[p][key]), _bits(opt_q.state[q][key]))
    assert step._lists is not None and step._lists[0][0][0] is opt_p.state[ps[0]]["exp_avg"]


def test_adam_step_defers_to_the_optimizer_where_it_must() -> None:
    """Hooks, foreach and other optimisers run through opt.step() (the hook is called)."""
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, foreach=True)
    assert not AdamStep(opt).direct
    assert not AdamStep(torch.optim.SGD([p], lr=0.1)).direct
    fused = torch.optim.Adam([p], lr=0.1, fused=True)
    calls = []
    fused.register_step_post_hook(lambda *a: calls.append(1))
    step = AdamStep(fused)
    for _ in range(3):
        p.grad = torch.ones(3)
        step()
    assert len(calls) == 3
    assert torch.allclose(p.detach(), torch.full((3,), -0.3), atol=1e-5)


def test_adam_step_takes_the_optimizers_step_without_the_hook_registries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PyTorch whose step-hook registries are not the dicts AdamStep reads (here a read-only
    mapping): it never goes direct, and its steps are opt.step()'s."""
    import types

    from torch.optim import optimizer as optim_module

    monkeypatch.setattr(optim_module, "_global_optimizer_pre_hooks", types.MappingProxyType({}))
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    step = AdamStep(torch.optim.Adam([p], lr=0.1, fused=True))
    ref = torch.optim.Adam([q], lr=0.1, fused=True)
    assert not step.direct
    for k in range(3):
        p.grad, q.grad = torch.full((3,), 1.0 + k), torch.full((3,), 1.0 + k)
        step()
        ref.step()
    assert torch.equal(p.detach(), q.detach())
