"""Images: the U-Net, image data sets, bits/dim accounting, local-classifier FD, NN distance, CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import iterflow.core.nn.unet  # noqa: F401  (registers "unet" until nn.py does)
import iterflow.data.images  # noqa: F401  (registers digits8, fashion-mnist until data/__init__ does)
from iterflow.core.flow import Block, Flow
from iterflow.core.nn import NETWORKS, build_network
from iterflow.core.nn.unet import UNet
from iterflow.data import get_dataset
from iterflow.data.images import (
    ImageDataset,
    Quantization,
    fashion_mnist_dir,
    image_dataset_from_path,
    read_idx,
)
from iterflow.errors import InputError
from iterflow.evaluation.bits_per_dim import bits_per_dim, image_bits_per_dim
from iterflow.evaluation.feature_classifier import (
    ClassifierConfig,
    FeatureClassifier,
    load_or_train_classifier,
    local_frechet_distance,
    rotation_task,
    train_classifier,
)
from iterflow.evaluation.image_samples import save_image_grid, save_trajectory_strip
from iterflow.evaluation.memorisation import nearest_train_distance
from iterflow.train.loop import Checkpoint, StepBudget

TINY_NET = {"channels": 8, "channel_mult": [1, 2]}


# ------------------------------------------------------------------------------------------------
# U-Net
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 7), (2, 6, 10)])
def test_unet_shapes_for_every_time_form(shape: tuple[int, int, int]) -> None:
    net = UNet(shape, channels=8, channel_mult=(1, 2, 2), zero_init=False)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    for t in (torch.tensor(0.3), torch.tensor([0.3]), torch.full((5,), 0.3), 0.3):
        assert net(x, t).shape == x.shape
    same = net(x, torch.tensor(0.3))
    assert torch.allclose(net(x, torch.full((5,), 0.3)), same, atol=1e-6)
    assert not torch.allclose(net(x, torch.tensor(0.9)), same, atol=1e-4)  # time matters


def test_unet_zero_init_is_the_identity_block_and_config_round_trips() -> None:
    net = UNet((1, 8, 8), **TINY_NET)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net(x, torch.tensor(0.5)), torch.zeros_like(x))
    assert NETWORKS.get("unet") is UNet
    noisy = UNet((1, 8, 8), **TINY_NET, zero_init=False)
    cfg = json.loads(json.dumps(noisy.config()))
    assert cfg["kind"] == "unet"
    rebuilt = build_network(cfg)
    rebuilt.load_state_dict(noisy.state_dict())
    assert torch.equal(rebuilt(x, torch.tensor(0.2)), noisy(x, torch.tensor(0.2)))


def test_unet_class_conditioning() -> None:
    net = UNet((1, 8, 8), **TINY_NET, num_classes=3, zero_init=False)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.4)
    y = torch.tensor([0, 1, 2, 0])
    with net.condition(y):
        v_ctx = net(x, t)
    assert torch.equal(v_ctx, net(x, t, y))
    assert not torch.allclose(net(x, t, y), net(x, t, torch.tensor([1, 1, 1, 1])))
    assert torch.equal(net(x, t), net(x, t, torch.full((4,), 3)))  # no label = index num_classes
    with pytest.raises(InputError, match="y"):
        net(x, t, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="labels"):
        with UNet((1, 8, 8), **TINY_NET).condition(y):
            pass


def test_unet_bf16_autocast_keeps_the_input_dtype_and_is_close() -> None:
    full = UNet((1, 8, 8), **TINY_NET, zero_init=False)
    half = UNet((1, 8, 8), **TINY_NET, zero_init=False, autocast="bf16")
    half.load_state_dict(full.state_dict())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = full(x, torch.tensor(0.5)), half(x, torch.tensor(0.5))
    assert b.dtype == x.dtype
    assert float((a - b).norm() / a.norm()) < 0.05
    assert not torch.equal(a, b)  # the autocast really ran in bf16


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"event_shape": (8, 8)}, "event_shape"),
        ({"event_shape": (1, 8, 8), "channel_mult": ()}, "channel_mult"),
        ({"event_shape": (1, 8, 8), "autocast": "fp8"}, "autocast"),
        ({"event_shape": (1, 8, 8), "dropout": 1.0}, "dropout"),
    ],
)
def test_unet_rejects_bad_arguments(kwargs: dict, argument: str) -> None:
    with pytest.raises(InputError, match=argument):
        UNet(**kwargs)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def test_digits8_splits_dequantize_and_keep_labels() -> None:
    import sklearn.datasets

    ds = get_dataset("digits8")
    assert isinstance(ds, ImageDataset) and ds.event_shape == (1, 8, 8) and ds.num_classes == 10
    sp = ds.splits(10**6, 100, 100, seed=3)
    lab = ds.label_splits(10**6, 100, 100, seed=3)
    assert sp.train.shape == (1597, 1, 8, 8) and sp.val.shape == sp.test.shape == (100, 1, 8, 8)
    assert lab.train.shape == (1597,) and lab.test.shape == (100,)
    q = ds.quantization
    assert float(sp.train.min()) >= q.low and float(sp.train.max()) <= q.high
    # dequantization noise is really there, and quantizing removes it
    frac = (sp.train - q.low) / q.step - q.quantize(sp.train).float()
    assert 0.4 < float(frac.mean()) < 0.6 and float(frac.std()) > 0.2
    # labels follow their images: each quantized image sits in sklearn's table with its label
    bunch = sklearn.datasets.load_digits()
    table = {
        bunch.images[i].astype(np.int64).tobytes(): int(bunch.target[i])
        for i in range(len(bunch.target))
    }
    for img, y in zip(q.quantize(sp.test[:30]), lab.test[:30], strict=True):
        assert table[img[0].numpy().astype(np.int64).tobytes()] == int(y)
    again = ds.splits(10**6, 100, 100, seed=3)
    assert torch.equal(again.train, sp.train)
    assert not torch.equal(ds.splits(10**6, 100, 100, seed=4).train, sp.train)


def test_quantization_round_trip_and_cell_centres() -> None:
    q = Quantization(levels=256, low=-1.0, high=1.0)
    x = torch.randint(0, 256, (50, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    s = q.dequantize(x, torch.Generator().manual_seed(1))
    assert torch.equal(q.quantize(s), x)
    assert torch.allclose(q.dequantize(x, None), -1 + (x + 0.5) * 2 / 256)
    with pytest.raises(InputError, match="value_range"):
        Quantization(256, 1.0, 0.0)


def _write_idx(path: Path, arr: np.ndarray, code: int) -> None:
    head = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
    data = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_files_gzipped_or_not(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6), dtype=np.uint8)
    labels = rng.integers(0, 3, 7, dtype=np.uint8)
    ipath = tmp_path / f"train-images-idx3-ubyte{suffix}"
    _write_idx(ipath, images, 0x08)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 0x08)
    assert np.array_equal(read_idx(ipath), images)
    ds = image_dataset_from_path(ipath)
    assert ds is not None and ds.event_shape == (1, 5, 6)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(
        ipath.read_bytes()[:20] if suffix == "" else gzip.decompress(ipath.read_bytes())[:20]
    )
    with pytest.raises(InputError, match="data bytes"):
        read_idx(bad)


def test_image_folder_and_npy_sources(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for k, cls in enumerate(["cat", "dog"]):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(2 + k):
            Image.fromarray(rng.integers(0, 256, (4, 5), dtype=np.uint8)).save(
                tmp_path / "pics" / cls / f"{i}.png"
            )
    ds = image_dataset_from_path(tmp_path / "pics")
    assert ds is not None and ds.event_shape == (1, 4, 5)
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.class_names == ("cat", "dog")
    arr = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)  # (n, H, W, C)
    np.save(tmp_path / "imgs.npy", arr)
    ds = image_dataset_from_path(tmp_path / "imgs.npy")
    assert ds is not None and ds.event_shape == (3, 4, 5)
    assert torch.equal(ds.images, torch.from_numpy(np.moveaxis(arr, 3, 1).copy()))
    np.save(tmp_path / "table.npy", rng.normal(size=(5, 2)))
    assert image_dataset_from_path(tmp_path / "table.npy") is None  # a table is not an image source
    np.save(tmp_path / "floats.npy", rng.normal(size=(5, 4, 4)))
    with pytest.raises(InputError, match="integer pixel values"):
        image_dataset_from_path(tmp_path / "floats.npy")


def test_fashion_mnist_missing_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ITERFLOW_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist")


@pytest.mark.skipif(
    not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_14_when_installed() -> None:
    ds = get_dataset("fashion-mnist-14")
    assert ds.event_shape == (1, 14, 14) and ds.n_rows == 60000 and ds.num_classes == 10
    sp = ds.splits(100, 10, 20, seed=0)
    assert sp.train.shape == (100, 1, 14, 14) and sp.test.shape == (20, 1, 14, 14)


# ------------------------------------------------------------------------------------------------
# bits per dimension
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels, low, high", [(256, 0.0, 1.0), (17, 0.0, 1.0), (256, -1.0, 1.0), (4, -3.0, 5.0)]
)
def test_uniform_model_scores_log2_levels(levels: int, low: float, high: float) -> None:
    # the uniform density on [low, high]^D has NLL D log(high - low); it is log2 K bits per pixel
    q, d = Quantization(levels, low, high), 10
    assert bits_per_dim(d * math.log(high - low), d, q) == pytest.approx(
        math.log2(levels), abs=1e-12
    )
    assert bits_per_dim(torch.full((3,), d * math.log(high - low)), d, q).shape == (3,)


class LinearVelocity(nn.Module):
    """``v(x, s) = -a x``: encodes ``u -> e^{-a} u`` with divergence ``-a D``."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: Tensor, s: Tensor | float) -> Tensor:
        return -self.a * x


def _gaussian_bpd_by_hand(s: Tensor, q: Quantization, mean: float, std: float) -> Tensor:
    """Per-image bpd of the model s ~ N(mean, std^2 I), computed directly in the units of
    y = (s - low) / step in [0, K)^D, where the model is N((mean - low) / step, (std / step)^2 I)."""
    y = (s.double() - q.low) / q.step
    m, sd = (mean - q.low) / q.step, std / q.step
    d = y[0].numel()
    nll_y = (
        0.5 * ((y - m) / sd).pow(2).flatten(1).sum(1)
        + 0.5 * d * math.log(2 * math.pi)
        + d * math.log(sd)
    )
    return nll_y / (d * math.log(2))


@pytest.mark.parametrize("a", [0.0, 0.7])
@pytest.mark.parametrize("levels, low, high", [(256, 0.0, 1.0), (17, -1.0, 1.0)])
def test_bits_per_dim_of_a_flow_with_known_density(
    a: float, levels: int, low: float, high: float
) -> None:
    # standardisation u = (s - mean) / std, then one block with v = -a u: the model density of s is
    # N(mean, (std e^a)^2 I), so its bpd can be computed by hand in the dequantized [0, K)^D units.
    q, mean, std = Quantization(levels, low, high), 0.375, 0.25  # exact in float32
    shape = (1, 3, 3)
    blocks = [Block(LinearVelocity(a))] if a > 0 else []
    flow = Flow(blocks, shape, shift=torch.full(shape, mean), scale=torch.full(shape, std)).double()
    x = torch.randint(0, levels, (40, *shape), generator=torch.Generator().manual_seed(0))
    s = q.dequantize(x, torch.Generator().manual_seed(1)).double()
    want = _gaussian_bpd_by_hand(s, q, mean, std * math.exp(a))
    for divergence in ("exact", "hutchinson"):  # Rademacher probes are exact for a multiple of I
        got = image_bits_per_dim(
            flow, s, q, solver="rk4", steps=20, divergence=divergence, probes=2, chunk=16
        )
        assert got.bpd == pytest.approx(float(want.mean()), abs=1e-7)
        assert got.n == 40 and got.dim == 9
    # the correction is not a no-op: without it the figure is off by log2(K / (high - low))
    nll = -flow.log_prob(s, solver="rk4", steps=20)
    raw = float(nll.detach().mean()) / (9 * math.log(2))
    assert raw - float(want.mean()) == pytest.approx(-math.log2(levels / (high - low)), abs=1e-7)


def test_encode_decode_round_trip_through_a_unet_flow() -> None:
    torch.manual_seed(0)
    net = UNet((1, 8, 8), **TINY_NET, zero_init=False)
    shape = (1, 8, 8)
    flow = Flow([Block(net)], shape, shift=torch.full(shape, 0.4), scale=torch.full(shape, 0.3))
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = flow.encode(x, solver="rk4", steps=16)
        back = flow.decode(z, solver="rk4", steps=16)
    assert float((z - flow.normalize(x)).abs().max()) > 1e-2  # the block really moves the points
    assert float((back - x).abs().max()) < 1e-4  # float32 round-off and O(h^4) solver error


# ------------------------------------------------------------------------------------------------
# FD on local classifier features, NN distance, pictures
# ------------------------------------------------------------------------------------------------


def test_local_classifier_is_cached_and_fd_separates_sets(tmp_path: Path) -> None:
    ds = get_dataset("digits8")
    sp, lab = ds.splits(10**6, 100, 100, seed=0), ds.label_splits(10**6, 100, 100, seed=0)
    cfg = ClassifierConfig(width=8, feature_dim=16, steps=60, batch_size=64)
    clf = load_or_train_classifier(
        sp.train,
        lab.train,
        cache_dir=tmp_path,
        name="digits8",
        config=cfg,
        val_x=sp.val,
        val_y=lab.val,
    )
    assert not clf.cached and clf.path is not None and clf.path.is_file() and clf.task == "labels"
    assert clf.val_accuracy > 0.3  # well above chance (0.1) after 60 steps
    again = load_or_train_classifier(
        sp.train, lab.train, cache_dir=tmp_path, name="digits8", config=cfg
    )
    assert again.cached and again.val_accuracy == pytest.approx(clf.val_accuracy)
    assert torch.equal(again.features(sp.test), clf.features(sp.test))
    other = dataclasses.replace(cfg, seed=1)
    assert (
        load_or_train_classifier(sp.train, lab.train, cache_dir=tmp_path, config=other).path
        != clf.path
    )
    same = local_frechet_distance(clf, sp.train[:500], sp.train[500:1000])
    noise = local_frechet_distance(clf, torch.rand(500, 1, 8, 8), sp.train[:500])
    assert noise > 5 * same
    # without labels the classifier learns to predict rotations
    rot = load_or_train_classifier(sp.train, None, cache_dir=tmp_path, config=cfg, val_x=sp.val)
    assert rot.task == "rotation" and rot.val_accuracy > 0.3  # chance is 0.25


def _weights(clf: FeatureClassifier) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in clf.net.state_dict().items()}


def _assert_same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_feature_classifier_trains_on_the_loop_deterministically_and_resumes(
    tmp_path: Path,
) -> None:
    ds = get_dataset("digits8")
    sp, lab = ds.splits(10**6, 100, 100, seed=0), ds.label_splits(10**6, 100, 100, seed=0)
    x, y = sp.train[:200], lab.train[:200]
    cfg = ClassifierConfig(width=4, feature_dim=8, steps=12, batch_size=32, checkpoint_every=4)
    state = torch.random.get_rng_state()
    want = _weights(train_classifier(x, y, cfg))
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded from cfg.seed alone
    _assert_same_weights(_weights(train_classifier(x, y, cfg)), want)  # same seed, same weights
    other = _weights(train_classifier(x, y, dataclasses.replace(cfg, seed=1)))
    assert not torch.equal(other["head.weight"], want["head.weight"])
    # it trains on the loop: interrupted after 6 steps (checkpoint at step 4), a second call
    # resumes from the checkpoint to the weights of the uninterrupted run, with the loop's log
    ck = Checkpoint(tmp_path / "progress", "classifier")
    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, cfg, checkpoint=ck, budget=StepBudget(6))
    assert json.loads(ck.meta.read_text())["step"] == 4
    _assert_same_weights(_weights(train_classifier(x, y, cfg, checkpoint=ck)), want)
    assert ck.read_log()[-1]["step"] == 12
    # the cache resumes an interrupted rotation-task training too, then drops its progress folder
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_or_train_classifier(x, None, cache_dir=cache, config=cfg, budget=StepBudget(5))
    assert not list(cache.glob("*.safetensors")) and len(list(cache.glob("*.progress"))) == 1
    clf = load_or_train_classifier(x, None, cache_dir=cache, config=cfg)
    assert not clf.cached and clf.task == "rotation" and not list(cache.glob("*.progress"))
    _assert_same_weights(_weights(clf), _weights(train_classifier(x, None, cfg)))
    # checkpoint_every does not change the weights, hence not the cache file either
    again = dataclasses.replace(cfg, checkpoint_every=5)
    assert load_or_train_classifier(x, None, cache_dir=cache, config=again).cached


def test_rotation_task_rotates_each_image_by_its_target() -> None:
    x = torch.rand(40, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    out, k = rotation_task(x, torch.Generator().manual_seed(1))
    assert set(k.tolist()) == {0, 1, 2, 3}
    for xi, oi, ki in zip(x, out, k, strict=True):
        assert torch.equal(oi, torch.rot90(xi, int(ki), dims=(-2, -1)))


def test_nearest_train_distance_detects_copies() -> None:
    ds = get_dataset("digits8")
    sp = ds.splits(10**6, 100, 100, seed=0)
    copies = nearest_train_distance(sp.train[:50], sp.train, sp.test)
    assert copies.samples_min == 0.0 and copies.ratio < 1e-6
    assert torch.equal(copies.nearest, torch.arange(50))
    fresh = nearest_train_distance(sp.test, sp.train, sp.test)
    assert fresh.ratio == pytest.approx(1.0)


def test_grid_and_trajectory_pngs(tmp_path: Path) -> None:
    q = Quantization(17)
    net = UNet((1, 8, 8), **TINY_NET, zero_init=False)
    flow = Flow(
        [Block(net)], (1, 8, 8), shift=torch.full((1, 8, 8), 0.3), scale=torch.full((1, 8, 8), 0.4)
    )
    g = save_image_grid(torch.rand(10, 1, 8, 8), tmp_path / "g.png", q)
    t = save_trajectory_strip(flow, tmp_path / "t.png", q, n=3, steps=4)
    for p in (g, t):
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# CLI and methods on images
# ------------------------------------------------------------------------------------------------


def _cli_app_with_image_eval() -> None:
    from iterflow.cli import app
    from iterflow.cli import images as image_commands

    if not any(c.name == "image-eval" for c in app.registered_commands):
        image_commands.register(app)


def test_cli_train_eval_and_image_eval_on_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.cli import main

    _cli_app_with_image_eval()
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            "digits8",
            "--network",
            "unet",
            "--net-option",
            "channels=8",
            "--net-option",
            "channel_mult=[1,2]",
            "--steps",
            "30",
            "--batch-size",
            "64",
            "--n-val",
            "40",
            "--no-report",
            "--quiet",
            "--out",
            str(run),
        ]
    )
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--n", "20", "--solver", "rk4", "--steps", "2"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["nll"])
    args = [
        "image-eval",
        str(run),
        "--json",
        "--n-bpd",
        "16",
        "--bpd-solver",
        "rk4",
        "--bpd-steps",
        "2",
        "--n-samples",
        "40",
        "--solver",
        "euler",
        "--steps",
        "2",
        "--nfe",
        "1,2",
        "--classifier-steps",
        "20",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["fd_label"] == "FD (local classifier features)" and math.isfinite(
        m["fd_local_classifier"]
    )
    assert set(m["fd_local_classifier_by_nfe"]) == {"1", "2"}
    assert 0 < m["bits_per_dim"]["bpd"] < 2 * math.log2(17) and m["bits_per_dim"]["n"] == 16
    assert m["nearest_train"]["samples_mean"] > 0 and not m["classifier"]["cached"]
    assert Path(m["grid"]).is_file() and Path(m["trajectory"]).is_file()
    assert (run / "image_metrics.json").is_file()
    assert main([*args, "--n-bpd", "0"]) == 0  # a second evaluation loads the cached classifier
    again = json.loads(capsys.readouterr().out)
    assert again["classifier"]["cached"] and "bits_per_dim" not in again
    assert main(["image-eval", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize(
    "flag, value, argument",
    [
        ("--classifier-steps", "0", "steps"),
        ("--bpd-steps", "0", "bpd_steps"),
        ("--bpd-solver", "nope", "bpd_solver"),
        ("--tol", "-1", "tol"),
        ("--n-samples", "1", "n_samples"),
    ],
)
def test_image_eval_errors_name_the_python_argument_and_the_cli_flag(
    flag: str, value: str, argument: str, capsys: pytest.CaptureFixture
) -> None:
    from iterflow.cli import main
    from iterflow.evaluation.image_eval import ImageEvalOptions

    _cli_app_with_image_eval()
    assert main(["image-eval", "no-such-run", flag, value]) == 2
    assert f"error: {flag}:" in capsys.readouterr().err
    kind = ClassifierConfig if flag == "--classifier-steps" else ImageEvalOptions
    typed = (
        float(value) if argument == "tol" else value if argument.endswith("solver") else int(value)
    )
    with pytest.raises(InputError, match=f"^{argument}:"):
        kind(**{argument: typed})


@pytest.mark.parametrize(
    "method, extra",
    [
        ("local-fm", {"blocks": 2, "options": {"h": 0.5, "report_n": 20}}),
        ("jko", {"blocks": 1, "steps": 3, "options": {"substeps": 1}}),
    ],
)
def test_progressive_methods_train_on_tiny_images(tmp_path: Path, method: str, extra: dict) -> None:
    from iterflow.methods import METHODS
    from iterflow.train import TrainConfig, train

    if method not in METHODS:
        pytest.skip(f"method {method} is not in this checkout")
    cfg = TrainConfig(
        **{
            "method": method,
            "data": "digits8",
            "network": "unet",
            "net_options": TINY_NET,
            "steps": 6,
            "batch_size": 32,
            "n_train": 200,
            "n_val": 20,
            "n_test": 20,
            **extra,
        }
    )
    flow = train(cfg, tmp_path / method).flow
    x = flow.sample(3, generator=torch.Generator().manual_seed(0), solver="euler", steps=2)
    assert x.shape == (3, 1, 8, 8) and bool(torch.isfinite(x).all())


def test_reflow_on_tiny_images(tmp_path: Path) -> None:
    from iterflow.methods import METHODS
    from iterflow.train import TrainConfig, train

    if "reflow" not in METHODS:
        pytest.skip("method reflow is not in this checkout")
    base = TrainConfig(
        data="digits8",
        network="unet",
        net_options=TINY_NET,
        steps=5,
        batch_size=32,
        n_train=200,
        n_val=20,
        n_test=20,
    )
    train(base, tmp_path / "fm")
    opts = {"source": str(tmp_path / "fm"), "n_pairs": 32, "pair_steps": 2}
    flow = train(dataclasses.replace(base, method="reflow", options=opts), tmp_path / "reflow").flow
    x = flow.sample(3, generator=torch.Generator().manual_seed(0), solver="euler", steps=1)
    assert x.shape == (3, 1, 8, 8) and bool(torch.isfinite(x).all())
