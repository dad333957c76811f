"""Tests for iterflow.data.

Every data set's shapes and seeding, exact densities against closed forms and brute force, file
loading and its errors, finite splits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from iterflow.data import (
    DATASETS,
    Dataset,
    GaussianMixture,
    ImageDensity,
    Splits,
    get_dataset,
    load_array,
)
from iterflow.data.image2d import img2d_candidates, resolve_img2d_dir
from iterflow.data.toy2d import RingMixture, SegmentMixture
from iterflow.errors import InputError

IMG2D_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "img2d"
HAS_IMG2D = (IMG2D_DIR / "img_rose.png").is_file() and (IMG2D_DIR / "img_tree.png").is_file()
IMAGE_NAMES = {"rose", "tree"}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_dataset(name: str) -> Dataset:
    if name in IMAGE_NAMES:
        if not HAS_IMG2D:
            pytest.skip(f"img2d folder absent: {IMG2D_DIR}")
        return get_dataset(name, img2d_dir=IMG2D_DIR)
    if name.startswith("fashion-mnist"):
        from iterflow.data.images import fashion_mnist_dir

        if not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists():
            pytest.skip("Fashion-MNIST files absent (Debian package dataset-fashion-mnist)")
    return get_dataset(name)


def grid_integral(data: Dataset, lo: float, hi: float, n: int) -> float:
    """Riemann sum of exp(log_prob) on an n x n grid over [lo, hi]^2 (float64)."""
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    cell = float(axis[1] - axis[0]) ** 2
    return float(torch.exp(data.log_prob(pts)).sum()) * cell


# --------------------------------------------------------------------------- every registered set


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_shapes_dtypes_and_seeding(name: str) -> None:
    data = make_dataset(name)
    x = data.sample(64, seeded(3))
    assert x.shape[0] == 64 and x[0].numel() == data.dim  # vectors (n, d) or images (n, C, H, W)
    assert x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()
    assert torch.equal(x, data.sample(64, seeded(3)))
    assert not torch.equal(x, data.sample(64, seeded(4)))
    info = data.describe()
    assert json.loads(json.dumps(info))["name"] == data.name
    assert {"name", "dim", "finite", "source", "has_log_prob"} <= set(info)
    assert info["dim"] == data.dim and info["finite"] == data.finite
    for dtype in (torch.float32, torch.float64):
        lp = data.log_prob(x.to(dtype))
        assert (lp is None) == (not info["has_log_prob"])
        if lp is not None:
            assert lp.shape == (64,) and lp.dtype == dtype and torch.isfinite(lp).all()


@pytest.mark.parametrize("name", ["moons", "8gaussians", "sklearn:iris"])
def test_splits_are_deterministic_per_seed(name: str) -> None:
    data = get_dataset(name)
    a, b = data.splits(40, 10, 10, seed=5), data.splits(40, 10, 10, seed=5)
    assert isinstance(a, Splits)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part), getattr(b, part))
        assert getattr(a, part).dtype == torch.float32
    assert not torch.equal(a.train, data.splits(40, 10, 10, seed=6).train)


def test_generated_splits_have_requested_sizes_and_independent_parts() -> None:
    s = get_dataset("rings").splits(50, 20, 30, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (50, 20, 30)
    assert not torch.equal(s.train[:20], s.val)


def test_entropy_is_none_without_density() -> None:
    assert get_dataset("moons").entropy() is None
    assert get_dataset("sklearn:iris").entropy() is None


# --------------------------------------------------------------------------- checkerboard


def test_checkerboard_samples_lie_in_the_eight_squares() -> None:
    x = get_dataset("checkerboard").sample(4000, seeded(0)).double()
    assert (x.abs() <= 4).all()
    cells = torch.floor(x / 2).clamp(-2, 1)
    assert ((cells.sum(1) % 2) == 0).all()
    occupied = {tuple(c) for c in cells.long().tolist()}
    assert len(occupied) == 8


def test_checkerboard_log_prob_and_entropy_exact() -> None:
    data = get_dataset("checkerboard")
    pts = torch.tensor(
        [[-3.0, -3.0], [-1.0, -3.0], [1.0, 1.0], [3.0, -1.0], [5.0, 0.0], [4.0, 4.0]]
    )
    expected = [-math.log(32), -math.inf, -math.log(32), -math.log(32), -math.inf, -math.log(32)]
    assert data.log_prob(pts).tolist() == pytest.approx(expected)
    assert data.entropy() == pytest.approx(math.log(32), abs=1e-12)
    assert grid_integral(data, -4.5, 4.5, 361) == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------- Gaussian mixtures


def random_mixture(d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * 2
    a = rng.normal(size=(k, d, d))
    covs = a @ a.transpose(0, 2, 1) + 0.3 * np.eye(d)
    weights = rng.uniform(0.5, 2.0, size=k)
    return means, covs, weights / weights.sum()


def test_gaussian_mixture_log_prob_matches_scipy() -> None:
    means, covs, weights = random_mixture(3, 4, seed=1)
    gm = GaussianMixture(means, covs, weights)
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(50, 3)) * 3)
    ref = np.log(
        sum(
            w * stats.multivariate_normal(m, c).pdf(x.numpy())
            for m, c, w in zip(means, covs, weights, strict=True)
        )
    )
    assert gm.log_prob(x).numpy() == pytest.approx(ref, rel=1e-10)
    assert gm.log_prob(x.float()).numpy() == pytest.approx(ref, rel=1e-5)


def test_gaussian_mixture_sample_moments() -> None:
    means, covs, weights = random_mixture(2, 3, seed=3)
    x = GaussianMixture(means, covs, weights).sample(40000, seeded(0)).double().numpy()
    mean = weights @ means
    assert x.mean(0) == pytest.approx(mean, abs=0.05)


def test_single_gaussian_mc_entropy_matches_closed_form() -> None:
    _, covs, _ = random_mixture(3, 1, seed=4)
    gm = GaussianMixture(np.zeros((1, 3)), covs)
    exact = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * covs[0]))
    est = gm.entropy_estimate(20000, seed=1)
    assert est is not None and not est.exact
    assert abs(est.value - exact) < 4 * est.stderr
    assert gm.entropy(20000, seed=1) == est.value


def test_gaussian_mixture_stds_forms_and_eight_gaussians() -> None:
    a = GaussianMixture([[0.0, 1.0], [2.0, 0.0]], stds=0.5)
    b = GaussianMixture([[0.0, 1.0], [2.0, 0.0]], stds=[[0.5, 0.5], [0.5, 0.5]])
    c = GaussianMixture([[0.0, 1.0], [2.0, 0.0]], torch.tensor([0.5, 0.5]), [1.0, 1.0])
    x = torch.randn(5, 2, generator=seeded(0), dtype=torch.float64)
    assert torch.allclose(a.log_prob(x), b.log_prob(x))
    assert torch.allclose(a.log_prob(x), c.log_prob(x))
    eight = get_dataset("8gaussians")
    assert isinstance(eight, GaussianMixture) and eight.n_components == 8
    radii = torch.linalg.vector_norm(eight.means, dim=1)
    assert torch.allclose(radii, torch.full((8,), 4 / math.sqrt(2), dtype=torch.float64))
    assert torch.allclose(eight.covs[0], torch.eye(2, dtype=torch.float64) * 0.125)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"means": [1.0, 2.0], "stds": 1.0}, "means"),
        ({"means": [[0.0, 0.0]]}, "covs"),
        ({"means": [[0.0, 0.0]], "covs": [[[1.0, 0.0], [0.0, -1.0]]]}, "covs"),
        ({"means": [[0.0, 0.0]], "covs": [[[1.0, 0.5], [0.0, 1.0]]]}, "covs"),
        ({"means": [[0.0, 0.0]], "stds": [[1.0, 1.0, 1.0]]}, "stds"),
        ({"means": [[0.0, 0.0]], "stds": -1.0}, "stds"),
        ({"means": [[0.0, 0.0]], "stds": 1.0, "weights": [-1.0]}, "weights"),
        ({"means": [[0.0, float("nan")]], "stds": 1.0}, "means"),
    ],
)
def test_gaussian_mixture_rejects_bad_parameters(kwargs: dict, argument: str) -> None:
    with pytest.raises(InputError, match=argument):
        GaussianMixture(**kwargs)


# --------------------------------------------------------------------------- rings, tree


def test_ring_log_prob_matches_angle_quadrature() -> None:
    rings = RingMixture("r", [1.0, 2.0], [1.0, 3.0], 0.3)
    x = torch.tensor([[0.0, 0.0], [1.1, 0.2], [-1.5, 1.4], [3.5, -0.5]], dtype=torch.float64)
    theta = np.linspace(0, 2 * np.pi, 4000, endpoint=False)
    ref = np.zeros(len(x))
    for r, w in ((1.0, 0.25), (2.0, 0.75)):
        centres = r * np.stack([np.cos(theta), np.sin(theta)], 1)
        dens = stats.multivariate_normal(cov=0.09 * np.eye(2)).pdf(x.numpy()[:, None] - centres)
        ref += w * dens.mean(1)
    assert rings.log_prob(x).numpy() == pytest.approx(np.log(ref), rel=1e-9)
    assert grid_integral(get_dataset("circles"), -5, 5, 301) == pytest.approx(1.0, abs=1e-3)


def test_segment_log_prob_matches_quadrature_and_integrates_to_one() -> None:
    segs = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    mix = SegmentMixture("s", segs, 0.2)
    x = torch.tensor([[0.5, 0.1], [-0.3, 1.0], [1.4, -0.2], [1.5, 2.6]], dtype=torch.float64)

    def density(p: np.ndarray) -> float:
        g = stats.multivariate_normal(cov=0.04 * np.eye(2))
        along_x = integrate.quad(lambda t: g.pdf(p - np.array([t, 0.0])), 0, 1, epsabs=0)[0]
        along_y = integrate.quad(lambda t: g.pdf(p - np.array([0.0, t])), 0, 2, epsabs=0)[0]
        return (along_x + along_y) / 3.0

    ref = np.log([density(p) for p in x.numpy()])
    assert mix.log_prob(x).numpy() == pytest.approx(ref, rel=1e-7)
    far = mix.log_prob(torch.tensor([[40.0, 30.0]], dtype=torch.float64))
    assert torch.isfinite(far).all()  # the tails stay finite where a direct sum underflows
    assert grid_integral(mix, -2, 3, 201) == pytest.approx(1.0, abs=1e-3)


# --------------------------------------------------------------------------- image densities


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def brute_image_log_prob(path: Path, x: np.ndarray) -> np.ndarray:
    """The README's mixture, summed over every pixel, written independently with numpy."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("L"), dtype=np.float64)[::-1, :]  # rot180 + mirror
    h, w = a.shape
    weights = (a.max() - a) / (a.max() - a).sum()
    xs, ys = np.linspace(-4, 4, w), np.linspace(-4, 4, h)
    sx, sy = 8 / w / 2, 8 / h / 2
    log_gx = stats.norm.logpdf(x[:, 0:1], xs[None], sx)  # (n, w)
    log_gy = stats.norm.logpdf(x[:, 1:2], ys[None], sy)  # (n, h)
    with np.errstate(divide="ignore"):
        terms = log_gy[:, :, None] + np.log(weights)[None] + log_gx[:, None, :]  # (n, h, w)
    return special.logsumexp(terms, axis=(1, 2))


@pytest.fixture
def tiny_png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(9, 14, 3), dtype=np.uint8)  # colour, h=9, w=14
    img[2:5, 3:9] = 255  # a white (massless) patch
    return write_png(tmp_path / "tiny.png", img)


@pytest.mark.parametrize("radius", [6, 1])
def test_image_log_prob_matches_brute_force(tiny_png: Path, radius: int) -> None:
    data = ImageDensity(tiny_png, radius=radius)
    x = torch.cat(
        [
            torch.rand(300, 2, generator=seeded(1), dtype=torch.float64) * 10 - 5,
            torch.tensor(
                [[0.0, 0.0], [-4.0, 4.0], [30.0, -2.0], [-25.0, 40.0]], dtype=torch.float64
            ),
        ]
    )
    ref = brute_image_log_prob(tiny_png, x.numpy())
    assert data.log_prob(x).numpy() == pytest.approx(ref, rel=1e-10)


def test_image_density_integrates_to_one_and_samples_match(tiny_png: Path) -> None:
    data = ImageDensity(tiny_png)
    assert grid_integral(data, -6, 6, 241) == pytest.approx(1.0, abs=1e-3)
    x = data.sample(20000, seeded(0)).double()
    grid = torch.linspace(-6, 6, 241, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    p = torch.exp(data.log_prob(pts))
    mean = (pts * p[:, None]).sum(0) / p.sum()
    assert torch.allclose(x.mean(0), mean, atol=0.05)


def test_image_orientation_dark_pixel_at_top_left(tmp_path: Path) -> None:
    img = np.full((10, 12), 255, dtype=np.uint8)
    img[0, 0] = 0  # top-left of the picture -> (x, y) = (-4, 4) after rot180 + mirror
    data = get_dataset(str(write_png(tmp_path / "dot.png", img)))
    assert isinstance(data, ImageDensity) and data.name == "dot"
    x = data.sample(100, seeded(0)).double()
    assert torch.allclose(x.mean(0), torch.tensor([-4.0, 4.0], dtype=torch.float64), atol=0.1)


def test_image_rejects_constant_and_unreadable(tmp_path: Path) -> None:
    flat = write_png(tmp_path / "flat.png", np.full((5, 5), 7, dtype=np.uint8))
    with pytest.raises(InputError, match="constant"):
        ImageDensity(flat)
    junk = tmp_path / "junk.png"
    junk.write_text("not a png")
    with pytest.raises(InputError, match="junk.png"):
        get_dataset(str(junk))


@pytest.mark.skipif(not HAS_IMG2D, reason=f"img2d folder absent: {IMG2D_DIR}")
@pytest.mark.parametrize(
    ("name", "value", "readme_se"), [("rose", 2.487, 0.004), ("tree", 1.950, 0.003)]
)
def test_img2d_entropy_matches_readme(name: str, value: float, readme_se: float) -> None:
    est = get_dataset(name, img2d_dir=IMG2D_DIR).entropy_estimate(100_000, seed=0)
    assert est is not None
    assert abs(est.value - value) < 3 * math.hypot(est.stderr, readme_se)


def test_img2d_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITERFLOW_IMG2D_DIR", str(tmp_path))
    assert img2d_candidates()[0] == tmp_path
    assert resolve_img2d_dir() == tmp_path
    with pytest.raises(InputError, match="img_rose.png"):
        get_dataset("rose")
    with pytest.raises(InputError, match="img2d_dir"):
        get_dataset("rose", img2d_dir=tmp_path / "missing")
    monkeypatch.delenv("ITERFLOW_IMG2D_DIR")
    monkeypatch.chdir(tmp_path)
    if not any(p.is_dir() for p in img2d_candidates()):
        with pytest.raises(InputError, match="looked in"):
            resolve_img2d_dir()


# --------------------------------------------------------------------------- files and tables


def test_npy_and_csv_round_trip(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).normal(size=(20, 3))
    np.save(tmp_path / "a.npy", arr)
    np.savetxt(tmp_path / "comma.csv", arr, delimiter=",", header="x,y,z", comments="")
    np.savetxt(tmp_path / "space.csv", arr)
    assert np.array_equal(load_array(tmp_path / "a.npy"), arr)
    assert load_array(tmp_path / "comma.csv") == pytest.approx(arr, rel=1e-12)
    assert load_array(tmp_path / "space.csv") == pytest.approx(arr, rel=1e-12)
    (tmp_path / "col.csv").write_text("v\n1\n2\n3\n")
    assert load_array(tmp_path / "col.csv").shape == (3, 1)
    data = get_dataset(str(tmp_path / "comma.csv"))
    assert data.finite and data.dim == 3 and data.log_prob(torch.zeros(2, 3)) is None
    assert data.describe()["n_rows"] == 20


@pytest.mark.parametrize(
    ("name", "content", "rule"),
    [
        ("missing.csv", None, "existing file"),
        ("empty.csv", "", "empty"),
        ("words.csv", "a,b\n1,x\n2,3\n3,4\n", "numbers"),
        ("ragged.csv", "1,2\n3\n4,5\n", "numbers"),
        ("two_rows.csv", "1,2\n3,4\n", "at least 3 rows"),
        ("nan.csv", "1,2\n3,nan\n4,5\n", "finite"),
        ("table.txt", "1 2\n3 4\n5 6\n", ".npy or .csv"),
        ("one_d.npy", np.arange(5.0), "2-D array"),
        ("three_d.npy", np.zeros((3, 2, 2)), "2-D array"),
        ("inf.npy", np.array([[1.0], [np.inf], [2.0]]), "finite"),
        ("text.npy", np.array([["a"], ["b"], ["c"]]), "real numbers"),
        ("broken.npy", "garbage", "readable .npy"),
    ],
)
def test_bad_files_raise_input_error_naming_the_path(
    tmp_path: Path, name: str, content: object, rule: str
) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(InputError, match=rule) as err:
        load_array(path)
    assert name in str(err.value) and err.value.argument == str(path)


def test_get_dataset_errors_name_the_data_option(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^data: .*checkerboard") as err:
        get_dataset("no-such-set")
    assert err.value.argument == "data"  # the Python argument; the CLI shows --data
    with pytest.raises(InputError, match="^data: "):
        get_dataset(str(tmp_path / "nope.npy"))
    (tmp_path / "table.txt").write_text("1 2\n")
    with pytest.raises(InputError, match=r"\.npy, \.csv or \.png"):
        get_dataset(str(tmp_path / "table.txt"))
    with pytest.raises(InputError, match="^data: "):
        get_dataset("sklearn:titanic")


def test_finite_splits_disjoint_covering_and_capped(tmp_path: Path) -> None:
    rows = np.arange(100.0).reshape(50, 2)
    np.save(tmp_path / "rows.npy", rows)
    data = get_dataset(str(tmp_path / "rows.npy"))
    s = data.splits(10_000, 10_000, 10_000, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 5)
    ids = torch.cat([s.train, s.val, s.test])[:, 0].long().tolist()
    assert sorted(ids) == list(range(0, 100, 2))
    small = data.splits(7, 2, 1, seed=0)
    assert (len(small.train), len(small.val), len(small.test)) == (7, 2, 1)
    assert torch.equal(small.test, s.test[:1])
    tiny = get_dataset(str(write_rows(tmp_path / "three.csv", 3))).splits(100, 100, 100, seed=1)
    assert (len(tiny.train), len(tiny.val), len(tiny.test)) == (1, 1, 1)


def write_rows(path: Path, n: int) -> Path:
    path.write_text("\n".join(f"{i},{i}" for i in range(n)))
    return path


def test_finite_sample_draws_rows_with_replacement() -> None:
    data = get_dataset("sklearn:iris")
    assert data.finite and data.dim == 4 and data.describe()["n_rows"] == 150
    x = data.sample(500, seeded(0))
    rows = {tuple(r) for r in data.splits(1000, 0, 0, seed=0).train.tolist()}
    assert {tuple(r) for r in x.tolist()} <= rows


def test_sklearn_sets_shapes() -> None:
    assert get_dataset("sklearn:wine").sample(3, seeded(0)).shape == (3, 13)
    assert get_dataset("sklearn:digits").dim == 64


# --------------------------------------------------------------------------- argument checks


def test_bad_arguments_raise_input_error() -> None:
    data = get_dataset("checkerboard")
    with pytest.raises(InputError, match="n"):
        data.sample(-1, seeded(0))
    with pytest.raises(InputError, match="generator"):
        data.sample(3, 0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="x: must have shape"):
        data.log_prob(torch.zeros(3, 3))
    with pytest.raises(InputError, match="floating"):
        data.log_prob(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(InputError, match="n_train"):
        data.splits(0, 1, 1, seed=0)
    with pytest.raises(InputError, match="seed"):
        data.splits(1, 1, 1, seed=-1)
    with pytest.raises(InputError, match="n_mc"):
        data.entropy(n_mc=0)
