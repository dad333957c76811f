"""The fast subset of the randomised closed-form harness (``benchmarks/bench_closed_form.py``).

Random Gaussian problems (random means, covariances with random eigenvectors and spread eigenvalues)
in dimensions 1 to 20, float64: the JKO step of ``KL(. || N(0, I))`` against a direct minimisation
and against JKO-flow's own loss, local flow matching's OU step, ``Flow.log_prob`` of
Gaussian-to-Gaussian flows, the finite-data rectified-flow velocity, the exact OT flow's cost and
the worst-case proximal maps. The trained cases at the library's defaults run in the benchmark;
here one small worst-case fit. Negative controls show that the checks can fail.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from closed_form_cases import (  # noqa: E402
    CASES,
    Perturbed,
    RandomField,
    minimise_over_gaussians,
    rel,
    stationarity,
    z_check,
)
from closed_form_training import case_worst_case_fit  # noqa: E402
from closed_forms import (  # noqa: E402
    DT,
    Gaussian,
    OUBridgeVelocity,
    generator,
    jko_gaussian_step,
    random_gaussian,
)

from iterflow.core.flow import Block, Flow  # noqa: E402
from iterflow.methods import METHODS, parse_options  # noqa: E402

FAST = [
    ("jko", 1), ("jko", 3), ("jko", 5),
    ("local_fm", 1), ("local_fm", 5), ("local_fm", 20),
    ("log_density", 1), ("log_density", 3), ("log_density", 20),
    ("rectified", 1), ("rectified", 10),
    ("ot_exact", 2), ("ot_exact", 20),
    ("worst_case_exact", 2), ("worst_case_exact", 20),
]  # fmt: skip


@pytest.mark.parametrize(("case", "d"), FAST, ids=[f"{c}-{d}d" for c, d in FAST])
def test_closed_form_case(case: str, d: int) -> None:
    checks = CASES[case](d, d, "test")
    outside = [c for c in checks if c.ok is False]
    assert checks and all(c.ok is not None or c.quantity == "default_max_abs" for c in checks)
    assert not outside, outside


def test_small_worst_case_fit_reaches_the_proximal_maps() -> None:
    checks = case_worst_case_fit(3, 0, "test")
    assert [c.quantity for c in checks] == ["quadratic_map", "linear_map"]
    assert all(c.ok for c in checks), checks


def test_jko_step_is_the_isotropic_formula_for_isotropic_data() -> None:
    m, s, gamma = torch.tensor([1.0, -0.5], dtype=DT), 0.5, 0.5
    step = jko_gaussian_step(Gaussian(m, s * s * torch.eye(2, dtype=DT)), gamma)
    sigma = (s + (s * s + 4 * gamma * (1 + gamma)) ** 0.5) / (2 * (1 + gamma))
    torch.testing.assert_close(step.mean, m / (1 + gamma))
    torch.testing.assert_close(step.cov, sigma**2 * torch.eye(2, dtype=DT))


def test_minimisation_tells_a_wrong_step_apart() -> None:
    """Negative control: the direct minimisation is far from a step with half the step size."""
    p = random_gaussian(3, generator(0))
    mu, cov, _ = minimise_over_gaussians(p, 1.0)
    wrong = jko_gaussian_step(p, 0.5)
    assert rel(mu, wrong.mean) > 0.1 and rel(cov, wrong.cov) > 0.02


def test_stationarity_tells_a_wrong_velocity_apart() -> None:
    """Negative control: local flow matching's loss is not stationary at the bridge velocity plus a
    small perturbation (``|delta| ~ 5%`` of the velocity), while it is at the bridge velocity."""
    d, h = 3, 0.5
    g = generator(1)
    p = random_gaussian(d, g)
    method_cls = METHODS["local-fm"]
    method = method_cls(parse_options(method_cls, {"hs": [h], "final_block": False}),
                        event_shape=(d,), num_blocks=1)  # fmt: skip
    x = p.exact_sample(2**15, g)
    bridge = OUBridgeVelocity(p, h)
    stage = Flow([Block(bridge)], (d,)).to(DT)

    def rows(module: torch.nn.Module) -> torch.Tensor:
        stage.blocks[0].velocity = module  # type: ignore[union-attr]
        return method.loss(stage, (x,), 0, generator(2)).rows * d

    field = RandomField(d, g)
    good = z_check("control", d, 0, "exact", stationarity(rows, bridge, [field])[:, 0])
    off = Perturbed(bridge, field, 0.05)
    bad = z_check("control", d, 0, "perturbed", stationarity(rows, off, [field])[:, 0])
    assert good.ok and not bad.ok, (good, bad)
