"""Per-row log-densities: ``score_rows`` against the closed form of a linear (Gaussian-to-Gaussian)
flow, Hutchinson's mean within its standard error, bits/dim, chunks, errors naming the row before
anything is integrated, and ``iterflow score`` writing .npy / .csv / stdout (exit 2 on bad input)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from iterflow.cli import main
from iterflow.core.flow import Block, Flow
from iterflow.core.ode import SolverSpec
from iterflow.errors import InputError
from iterflow.evaluation.evaluate import nll_per_sample
from iterflow.evaluation.score import check_rows, score_rows

DT = torch.float64
TIGHT = {"solver": "dopri5", "atol": 1e-9, "rtol": 1e-9}


class Linear(nn.Module):
    """``v(x, s) = A x``: the block maps ``u`` to ``expm(A) u`` with log-determinant ``tr A``."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return x.reshape(len(x), -1) @ self.a.T


def linear_flow() -> tuple[Flow, Tensor, Tensor]:
    """A flow whose data density is ``N(shift, L L^T)``, ``L = diag(scale) expm(-A)``."""
    a = torch.tensor([[0.3, 0.4, -0.2], [-0.1, -0.5, 0.3], [0.2, 0.1, 0.1]], dtype=DT)
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    scale = torch.tensor([2.0, 0.5, 1.0], dtype=DT)
    flow = Flow([Block(Linear(a))], (3,), shift=shift, scale=scale)
    chol = torch.diag(scale) @ torch.linalg.matrix_exp(-a)
    return flow, shift, chol


def gaussian_rows(n: int, seed: int = 0) -> tuple[Flow, Tensor, Tensor]:
    """``(flow, x, log p(x))``: ``n`` rows drawn from the flow's Gaussian and their exact log-density."""
    flow, shift, chol = linear_flow()
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)
    x = shift + z @ chol.T
    mvn = torch.distributions.MultivariateNormal(
        shift, scale_tril=None, covariance_matrix=chol @ chol.T
    )
    return flow, x, mvn.log_prob(x)


def nfe_total(flow: Flow) -> int:
    return sum(b.nfe for b in flow.chain)


# ------------------------------------------------------------------------------------------------
# the library
# ------------------------------------------------------------------------------------------------


def test_exact_scores_match_the_gaussian_closed_form() -> None:
    flow, x, exact = gaussian_rows(64)
    r = score_rows(flow, x, divergence="exact", **TIGHT)
    assert r.values.shape == (64,) and r.values.dtype == DT
    assert r.stderr is None and r.units == "nats" and r.name == "log_density"
    assert r.divergence == "exact" and r.probes is None and r.nfe > 0
    torch.testing.assert_close(r.values, exact, atol=1e-6, rtol=0)
    # "auto" is exact in 3 dimensions; a NumPy array of rows gives the same values
    auto = score_rows(flow, x.numpy(), **TIGHT)
    assert auto.divergence == "exact"
    torch.testing.assert_close(auto.values, r.values, atol=1e-12, rtol=0)
    # the test NLL of `iterflow eval` runs the same loop (with the batch-wide error control)
    nll, _ = nll_per_sample(flow, x, spec=SolverSpec("dopri5", 16, 1e-9, 1e-9), divergence="exact")
    batch = score_rows(flow, x, divergence="exact", error_norm="batch", **TIGHT)
    torch.testing.assert_close(-nll, batch.values, atol=1e-12, rtol=0)
    torch.testing.assert_close(-nll, r.values, atol=1e-7, rtol=0)
    summary = r.summary()
    assert summary["n"] == 64 and summary["median_stderr"] is None
    assert summary["min"] <= summary["mean"] <= summary["max"]


def test_compiled_scores_match_the_gaussian_closed_form() -> None:
    """``compile=True`` (:meth:`Flow.compiled`, here a velocity without one-pass terms: the
    compiled forward under autograd's trace) gives the closed form as the eager loop does."""
    flow, x, exact = gaussian_rows(48, seed=2)
    r = score_rows(flow, x, divergence="exact", compile=True, chunk=32, **TIGHT)
    torch.testing.assert_close(r.values, exact, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="compile"):
        score_rows(flow, x, compile="yes")  # type: ignore[arg-type]


def test_hutchinson_mean_lies_within_its_standard_error_of_the_exact_value() -> None:
    flow, x, exact = gaussian_rows(64, seed=1)
    gen = torch.Generator().manual_seed(7)
    h = score_rows(flow, x, divergence="hutchinson", probes=16, generator=gen, **TIGHT)
    assert h.divergence == "hutchinson" and h.probes == 16 and h.stderr is not None
    assert bool((h.stderr > 0).all())  # A has off-diagonal entries: each probe's estimate varies
    z = (h.values - exact) / h.stderr
    assert float((z.abs() < 3).double().mean()) >= 0.9, z
    assert float(z.abs().mean()) < 1.5
    # unbiased: the mean error over rows is within 4 standard errors of that mean
    assert abs(float((h.values - exact).mean())) < 4 * float(h.stderr.pow(2).sum().sqrt()) / 64
    # reproducible: the same seed gives the same values; the default generator is seeded too
    again = score_rows(
        flow,
        x,
        divergence="hutchinson",
        probes=16,
        generator=torch.Generator().manual_seed(7),
        **TIGHT,
    )
    assert torch.equal(again.values, h.values) and torch.equal(again.stderr, h.stderr)
    d1 = score_rows(flow, x[:8], divergence="hutchinson", probes=4, solver="rk4", steps=4)
    d2 = score_rows(flow, x[:8], divergence="hutchinson", probes=4, solver="rk4", steps=4)
    assert torch.equal(d1.values, d2.values)


def test_bits_per_dim_is_minus_log_density_over_d_ln2() -> None:
    flow, x, _ = gaussian_rows(20, seed=2)
    nats = score_rows(flow, x, divergence="hutchinson", probes=8, **TIGHT)
    bpd = score_rows(flow, x, divergence="hutchinson", probes=8, bits_per_dim=True, **TIGHT)
    per = 3 * math.log(2.0)
    assert bpd.units == "bits/dim" and bpd.name == "bits_per_dim"
    torch.testing.assert_close(bpd.values, -nats.values / per, atol=1e-12, rtol=0)
    assert nats.stderr is not None and bpd.stderr is not None
    torch.testing.assert_close(bpd.stderr, nats.stderr / per, atol=1e-12, rtol=0)
    exact = score_rows(flow, x, divergence="exact", bits_per_dim=True, **TIGHT)
    assert exact.stderr is None and exact.units == "bits/dim"


def test_chunks_give_the_same_values_and_report_progress() -> None:
    flow, x, _ = gaussian_rows(23, seed=3)
    whole = score_rows(flow, x, divergence="exact", solver="rk4", steps=8)
    seen: list[tuple[int, int]] = []
    parts = score_rows(
        flow,
        x,
        divergence="exact",
        solver="rk4",
        steps=8,
        chunk=5,
        progress=lambda done, total: seen.append((done, total)),
    )
    torch.testing.assert_close(parts.values, whole.values, atol=1e-12, rtol=0)
    assert seen == [(5, 23), (10, 23), (15, 23), (20, 23), (23, 23)]
    # Hutchinson: each row repeated once per probe, so chunk // probes rows per solver call
    seen.clear()
    h = score_rows(
        flow,
        x,
        divergence="hutchinson",
        probes=4,
        solver="rk4",
        steps=8,
        chunk=8,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert [d for d, _ in seen] == list(range(2, 23, 2)) + [23] and h.values.shape == (23,)


def test_image_shaped_rows_flattened_or_not() -> None:
    class Shrink(nn.Module):  # v = -0.3 x: z = exp(-0.3) u, log-det = -0.3 d
        def forward(self, x: Tensor, s: Tensor) -> Tensor:
            return -0.3 * x

    flow = Flow([Block(Shrink())], (1, 2, 2)).to(DT)
    x = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=DT)
    r4 = score_rows(flow, x, divergence="exact", **TIGHT)
    flat = score_rows(flow, x.reshape(6, 4), divergence="exact", **TIGHT)
    z = math.exp(-0.3) * x.reshape(6, 4)
    expected = -0.5 * (z**2).sum(1) - 2 * math.log(2 * math.pi) - 0.3 * 4
    torch.testing.assert_close(r4.values, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(flat.values, r4.values, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "bad, needles",
    [
        ("nan", ["x", "finite", "row 7, column 1"]),
        ("two", ["x", "2 rows (7, 11)", "row 7"]),
        ("width", ["x", "rows of 3 values", "2 values per row"]),
        ("flat", ["x", "rows of 3 values"]),
        ("empty", ["x", "at least one row"]),
        ("bool", ["x", "real numbers"]),
        ("list", ["x", "torch.Tensor"]),
    ],
)
def test_bad_rows_are_named_before_anything_is_integrated(bad: str, needles: list[str]) -> None:
    flow, x, _ = gaussian_rows(40)
    if bad == "nan":
        x[7, 1] = float("nan")
    elif bad == "two":
        x[7, 1], x[11, 0] = float("nan"), float("inf")
    rows = {
        "width": torch.zeros(5, 2, dtype=DT),
        "flat": torch.zeros(6, dtype=DT),
        "empty": torch.zeros(0, 3, dtype=DT),
        "bool": torch.zeros(4, 3, dtype=torch.bool),
        "list": [[0.0, 0.0, 0.0]],
    }.get(bad, x)
    before = nfe_total(flow)
    with pytest.raises(InputError) as info:
        score_rows(flow, rows)  # type: ignore[arg-type]
    assert nfe_total(flow) == before
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


class Radial(nn.Module):
    """``v(x, s) = -k(x / |x|) (1 + cos 6s) x`` with a rate ``k`` that depends on the direction only
    (0-homogeneous, so ``x . grad k = 0``): every ray is kept, ``x(1) = x exp(-k g)`` with
    ``g = 1 + sin(6) / 6`` and ``div v = -d k (1 + cos 6s)``. ``k`` is 80 times larger around
    one direction ``e``: the rows near it are the hard ones."""

    def __init__(self, e: Tensor) -> None:
        super().__init__()
        self.register_buffer("e", e)

    def rate(self, x: Tensor) -> Tensor:
        cos = (x @ self.e) / x.norm(dim=1)
        return 0.5 + 40.0 * torch.exp(-50.0 * (1.0 - cos))

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return -(self.rate(x) * (1 + torch.cos(6 * s)))[:, None] * x


@pytest.mark.parametrize("dim", [2, 3, 8])
def test_scores_hold_every_row_to_the_tolerance_by_default(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    e = torch.randn(dim, generator=gen, dtype=DT)
    e = e / e.norm()
    x = torch.randn(3000, dim, generator=gen, dtype=DT)
    x[17] = 1.3 * e  # the hardest row
    field = Radial(e)
    flow = Flow([Block(field)], (dim,)).to(DT)
    g = 1.0 + math.sin(6.0) / 6
    k = field.rate(x)
    z = x * torch.exp(-k * g)[:, None]
    want = -0.5 * z.pow(2).sum(1) - 0.5 * dim * math.log(2 * math.pi) - dim * k * g
    tol = 1e-6
    default = score_rows(flow, x, divergence="exact", atol=tol, rtol=tol)
    rows = score_rows(flow, x, divergence="exact", atol=tol, rtol=tol, error_norm="rows")
    batch = score_rows(flow, x, divergence="exact", atol=tol, rtol=tol, error_norm="batch")
    assert torch.equal(default.values, rows.values) and default.nfe == rows.nfe
    for r in (rows, batch):  # both meet the closed form to within a few tolerance units
        err = (r.values - want).abs() / (tol + tol * want.abs())
        assert float(err.max()) < 5, (r.nfe, float(err.max()))
    assert rows.nfe != batch.nfe  # the control reached the solver (different step sequences)
    with pytest.raises(InputError) as info:
        score_rows(flow, x[:4], error_norm="max")
    assert info.value.argument == "error_norm"


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"divergence": "hutchinson", "probes": 1}, "probes"),
        ({"divergence": "hutchinson", "probes": 0}, "probes"),
        ({"chunk": 0}, "chunk"),
        ({"divergence": "trace"}, "divergence"),
        ({"probe_kind": "uniform"}, "probe_kind"),
        ({"solver": "rk5"}, "solver"),
        ({"bits_per_dim": "yes"}, "bits_per_dim"),
    ],
)
def test_bad_settings_name_their_argument(kwargs: dict, argument: str) -> None:
    flow, x, _ = gaussian_rows(4)
    with pytest.raises(InputError) as info:
        score_rows(flow, x, **kwargs)
    assert info.value.argument == argument


def test_check_rows_shapes() -> None:
    assert check_rows(torch.zeros(4, 6), (2, 3)).shape == (4, 2, 3)
    assert check_rows(np.zeros((4,), dtype=np.int64), (1,)).dtype == torch.get_default_dtype()
    assert check_rows(torch.zeros(4, 1, 2, 2), (1, 2, 2)).shape == (4, 1, 2, 2)


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from iterflow.train import TrainConfig, train

    cfg = TrainConfig.for_method(
        "fm",
        data="8gaussians",
        steps=30,
        hidden=(16,),
        batch_size=64,
        n_train=300,
        n_val=30,
        n_test=30,
        dtype="float64",
        seed=0,
    )
    out = tmp_path_factory.mktemp("score") / "run"
    train(cfg, out)
    return out


def flow_of(run: Path) -> Flow:
    from iterflow.train import load_run

    return load_run(run)[0]


@pytest.fixture
def rows() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=2.0, size=(37, 2))


FAST = ["--solver", "rk4", "--steps", "4", "--quiet"]


def test_cli_writes_npy_and_csv(
    tiny_run: Path, rows: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.train import load_run

    data = tmp_path / "rows.npy"
    np.save(data, rows)
    out = tmp_path / "scores.npy"
    assert main(["score", str(tiny_run), "--data", str(data), "--out", str(out), *FAST]) == 0
    got = np.load(out)
    # dopri5 with either error control (default rows) meets a tight reference
    tight = score_rows(flow_of(tiny_run), rows, divergence="exact", **TIGHT).values.numpy()
    for norm in ("rows", "batch"):
        adaptive = tmp_path / f"adaptive_{norm}.npy"
        args = ["--data", str(data), "--out", str(adaptive), "--error-norm", norm, "--quiet"]
        assert main(["score", str(tiny_run), *args]) == 0
        assert np.allclose(np.load(adaptive), tight, atol=1e-3, rtol=0)
    flow = load_run(tiny_run)[0]
    ref = score_rows(flow, rows, divergence="exact", solver="rk4", steps=4).values.numpy()
    assert got.shape == (37,) and np.allclose(got, ref, atol=1e-10, rtol=0)
    compiled = tmp_path / "compiled.npy"  # the MLP's one-pass terms through torch.compile
    args = ["--data", str(data), "--out", str(compiled), "--compile", *FAST]
    assert main(["score", str(tiny_run), *args]) == 0
    assert np.allclose(np.load(compiled), ref, atol=1e-9, rtol=0)
    # the same rows from a CSV file with a header, written as CSV
    csv_in = tmp_path / "rows.csv"
    csv_in.write_text("a,b\n" + "\n".join(f"{u!r},{v!r}" for u, v in rows.tolist()) + "\n")
    csv_out = tmp_path / "scores.csv"
    assert main(["score", str(tiny_run), "--data", str(csv_in), "--out", str(csv_out), *FAST]) == 0
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "log_density" and len(lines) == 38
    assert np.allclose(np.array([float(v) for v in lines[1:]]), got, atol=1e-10, rtol=0)
    # Hutchinson with a standard error: (n, 2) in .npy, two columns in .csv; bits/dim on request
    args = ["score", str(tiny_run), "--data", str(data), "--probes", "4", "--seed", "3", *FAST]
    assert main([*args, "--out", str(tmp_path / "h.npy")]) == 0
    h = np.load(tmp_path / "h.npy")
    # (in 2-D a Rademacher probe gives one of two estimates, so all 4 can agree: stderr 0)
    assert h.shape == (37, 2) and (h[:, 1] >= 0).all() and (h[:, 1] > 0).mean() > 0.5
    assert main([*args, "--bits-per-dim", "--out", str(tmp_path / "h.csv")]) == 0
    text = (tmp_path / "h.csv").read_text().splitlines()
    assert text[0] == "bits_per_dim,stderr" and len(text) == 38
    table = np.loadtxt(text[1:], delimiter=",")
    per = 2 * math.log(2.0)
    assert np.allclose(table[:, 0], -h[:, 0] / per) and np.allclose(table[:, 1], h[:, 1] / per)
    capsys.readouterr()


def test_cli_prints_one_value_per_line_with_a_progress_bar(
    tiny_run: Path, rows: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "rows.npy"
    np.save(data, rows)
    capsys.readouterr()
    code = main(
        [
            "score",
            str(tiny_run),
            "--data",
            str(data),
            "--solver",
            "rk4",
            "--steps",
            "4",
            "--chunk",
            "10",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    values = [float(v) for v in captured.out.split()]
    assert len(values) == 37 and all(math.isfinite(v) for v in values)
    assert "scored 37 rows of rows.npy (exact trace)" in captured.err
    code = main(["score", str(tiny_run), "--data", str(data), "--probes", "3", *FAST])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 37 and all(len(ln.split(",")) == 2 for ln in lines)


def test_cli_bad_input_exits_2_naming_the_flag_and_the_row(
    tiny_run: Path, rows: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def bad(args: list[str], *needles: str) -> None:
        out = tmp_path / "never.npy"
        code = main(["score", str(tiny_run), *args, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err and not out.exists()
        for needle in needles:
            assert needle in err, (needle, err)

    data = tmp_path / "rows.npy"
    np.save(data, rows)
    bad(["--data", str(data), "--error-norm", "max"], "--error-norm", "rows", "max")
    nan = tmp_path / "nan.npy"
    with_nan = rows.copy()
    with_nan[2, 1] = np.nan
    np.save(nan, with_nan)
    bad(["--data", str(nan)], "--data nan.npy", "row 2", "finite")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((5, 3)))
    bad(["--data", str(wide)], "--data wide.npy", "3 values per row")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("x,y\n1,2\n3,4,5\n6,7\n")
    bad(["--data", str(ragged)], "--data ragged.csv", "row 1 (line 3)")
    word = tmp_path / "word.csv"
    word.write_text("1,2\n3,four\n")
    bad(["--data", str(word)], "--data word.csv", "row 1 (line 2), column 1")
    bad(["--data", str(tmp_path / "missing.npy")], "--data missing.npy", "existing file")
    good = tmp_path / "good.npy"
    np.save(good, rows)
    bad(["--data", str(good), "--probes", "1"], "--probes")
    bad(["--data", str(good), "--chunk", "0"], "--chunk")
    bad(["--data", str(good), "--solver", "rk5"], "--solver", "rk5")
    code = main(["score", str(tiny_run), "--data", str(good), "--out", str(tmp_path / "s.txt")])
    assert code == 2 and "--out" in capsys.readouterr().err
    code = main(["score", str(tmp_path / "norun"), "--data", str(good)])
    assert code == 2 and "run" in capsys.readouterr().err
