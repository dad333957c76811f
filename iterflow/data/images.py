"""Image data sets: discrete pixels, uniformly dequantized and scaled to a continuous range.

Sources: MNIST-format IDX files (gzipped or not), folders of PNG/JPEG images (one sub-folder per
class gives labels), ``.npy`` arrays of integer pixels, scikit-learn's bundled 8x8 digits
(``"digits8"``, 17 grey levels) and Fashion-MNIST from the files of Debian's
``dataset-fashion-mnist`` package (``"fashion-mnist"``, and ``"fashion-mnist-14"`` downsampled to
14x14).

Preprocessing (Theis, van den Oord, Bethge, arXiv 1511.01844; Dinh et al., arXiv 1605.08803): an
image ``x`` with integer pixels in ``{0, ..., K-1}`` (``K`` = ``levels``) becomes

.. math::
    s = \\mathrm{low} + (\\mathrm{high} - \\mathrm{low})\\, \\frac{x + u}{K}, \\qquad
    u \\sim U[0, 1)^D,

a point of ``[low, high)^D`` (default ``[0, 1)``). The continuous model is fitted to ``s``; bits per
dimension (:func:`iterflow.evaluation.bits_per_dim.bits_per_dim`) undo the scaling with its
log-Jacobian. The trainer
takes fixed split tensors, so each split is dequantized once with a noise seeded from the run's seed
(:meth:`ImageDataset.sample` draws fresh noise).

Labels, when the source has them, are kept: :attr:`ImageDataset.labels` and
:meth:`ImageDataset.label_splits` (rows aligned with :meth:`ImageDataset.splits`).
"""

from __future__ import annotations

import gzip
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iterflow.data.base import (
    Dataset,
    Splits,
    check_seed,
    check_split_sizes,
    child_seeds,
    seeded_generator,
)
from iterflow.data.tabular import load_npy
from iterflow.errors import check_positive, fail

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "ITERFLOW_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """Discrete pixels ``{0..levels-1}`` <-> continuous values in ``[low, high)``.

    ``s = low + step * (x + u)`` with ``step = (high - low) / levels`` and ``u ~ U[0, 1)``; the map
    ``y = x + u -> s`` has Jacobian ``step`` per dimension, so ``log |ds/dy| = D log(step)``.

    Attributes:
        levels: number of discrete values ``K`` (256 for 8-bit images, 17 for sklearn digits).
        low, high: the continuous range.
    """

    levels: int = 256
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        check_positive(self.levels, "levels", integer=True)
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            fail("value_range", "must be finite (low, high) with low < high", (self.low, self.high))

    @property
    def step(self) -> float:
        """Width ``(high - low) / levels`` of one grey level in continuous units."""
        return (self.high - self.low) / self.levels

    def log_jacobian(self, dim: int) -> float:
        """``log |det ds/dy| = D log(step)`` for ``D = dim`` pixels (``y`` in ``[0, K)^D``)."""
        return dim * math.log(self.step)

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``low + step (x + u)``, ``u ~ U[0,1)``; ``generator=None``: ``u = 1/2``."""
        xf = x.to(torch.float32)  # exact for integers below 2^24
        if generator is None:
            u = torch.full_like(xf, 0.5)
        else:
            u = torch.rand(xf.shape, generator=generator, dtype=torch.float32)
        return xf.add_(u).mul_(self.step).add_(self.low)

    def quantize(self, s: torch.Tensor) -> torch.Tensor:
        """Continuous values -> pixels ``floor((s - low) / step)`` clipped to ``[0, K-1]``."""
        return (
            ((s.double() - self.low) / self.step).floor().clamp(0, self.levels - 1).to(torch.int64)
        )

    def to_json(self) -> dict[str, Any]:
        return {"levels": self.levels, "low": self.low, "high": self.high}


# ------------------------------------------------------------------------------------------------
# the data set
# ------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """A finite set of discrete images, served dequantized and scaled (``finite``; no density).

    Arguments:
        images: ``(n, C, H, W)`` integer pixels in ``[0, levels)``.
        name: data set name.
        source: where the images came from.
        labels: ``(n,)`` integer class labels, or ``None``.
        levels: number of grey levels ``K``.
        value_range: ``(low, high)`` continuous range.
        test_images, test_labels: an official test set (used for the ``test`` split), or ``None``.
        class_names: names of the classes (optional).

    Attributes:
        event_shape: ``(C, H, W)``; dim: ``C * H * W``; quantization: the :class:`Quantization`.
    """

    finite = True
    has_log_prob = False

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        name: str,
        source: str,
        *,
        labels: np.ndarray | torch.Tensor | None = None,
        levels: int = 256,
        value_range: tuple[float, float] = (0.0, 1.0),
        test_images: np.ndarray | torch.Tensor | None = None,
        test_labels: np.ndarray | torch.Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        self.quantization = Quantization(levels, float(value_range[0]), float(value_range[1]))
        self.images = _check_pixels(images, name, levels)
        self.labels = _check_labels(labels, self.images.shape[0], name)
        self.test_images = None if test_images is None else _check_pixels(test_images, name, levels)
        self.test_labels = None
        if self.test_images is not None:
            if tuple(self.test_images.shape[1:]) != tuple(self.images.shape[1:]):
                fail(
                    name,
                    f"test images must have the shape {tuple(self.images.shape[1:])} of the "
                    "training images",
                    tuple(self.test_images.shape[1:]),
                )
            self.test_labels = _check_labels(test_labels, self.test_images.shape[0], name)
        self.name, self.source, self.class_names = name, source, class_names
        self.event_shape = tuple(int(s) for s in self.images.shape[1:])
        self.dim = math.prod(self.event_shape)

    @property
    def n_rows(self) -> int:
        """Number of training-pool images (the official test set excluded)."""
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (``max label + 1``), 0 without labels."""
        if self.labels is None:
            return 0
        top = int(self.labels.max())
        if self.test_labels is not None:
            top = max(top, int(self.test_labels.max()))
        return top + 1

    # -- splits ----------------------------------------------------------------------------------
    def _split_rows(
        self, n_train: int, n_val: int, n_test: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """Row indices of each split (``test`` indexes ``test_images`` when there is one)."""
        n_train, n_val, n_test = check_split_sizes(n_train, n_val, n_test)
        order = torch.randperm(self.n_rows, generator=seeded_generator(check_seed(seed)))
        tenth = max(1, round(0.1 * self.n_rows))
        k_val = min(n_val, tenth)
        if self.test_images is not None:
            test = torch.arange(min(n_test, self.test_images.shape[0]))
            k_test = 0
        else:
            k_test = min(n_test, tenth)
            test = order[:k_test]
        val = order[k_test : k_test + k_val]
        k_train = min(n_train, self.n_rows - k_test - k_val)
        train = order[k_test + k_val : k_test + k_val + k_train]
        return {"train": train, "val": val, "test": test}

    def _pixels(self, part: str, rows: torch.Tensor) -> torch.Tensor:
        if part == "test" and self.test_images is not None:
            return self.test_images[rows]
        return self.images[rows]

    def splits(
        self, n_train: int, n_val: int, n_test: int, seed: int, *, dequantize: bool = True
    ) -> Splits:
        """Disjoint train/val/test images, dequantized and scaled, ``(n_split, C, H, W)`` float32.

        Rows are shuffled with ``seed``; ``val`` (and ``test`` when the source has no official test
        set) take about 10% of the images each, at most ``n_val`` / ``n_test``; ``train`` the rest,
        at most ``n_train``. Each split's dequantization noise comes from an independent child of
        ``seed``; ``dequantize=False`` gives the centres of the grey-level cells instead
        (``u = 1/2``).
        """
        rows = self._split_rows(n_train, n_val, n_test, seed)
        seeds = child_seeds(check_seed(seed) + 1, 3)
        out = []
        for (part, idx), s in zip(rows.items(), seeds, strict=True):
            gen = seeded_generator(s) if dequantize else None
            out.append(self.quantization.dequantize(self._pixels(part, idx), gen))
        return Splits(*out)

    def label_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Class labels ``(n_split,)`` int64 aligned with the rows of :meth:`splits`.

        Raises:
            InputError: the data set has no labels.
        """
        if self.labels is None:
            fail("data", "must have class labels for this use", self.name)
        rows = self._split_rows(n_train, n_val, n_test, seed)
        test_labels = self.test_labels if self.test_images is not None else self.labels
        if test_labels is None:
            fail("data", "must have labels for its test images", self.name)
        return Splits(
            self.labels[rows["train"]], self.labels[rows["val"]], test_labels[rows["test"]]
        )

    def describe(self) -> dict[str, Any]:
        """Name, dim, event shape, finite, source, sizes, quantization and classes."""
        return {
            "name": self.name,
            "dim": self.dim,
            "event_shape": list(self.event_shape),
            "finite": True,
            "source": self.source,
            "has_log_prob": False,
            "n_rows": self.n_rows,
            "n_test_rows": 0 if self.test_images is None else int(self.test_images.shape[0]),
            "dequantization": "uniform",
            **self.quantization.to_json(),
            "num_classes": self.num_classes,
        }

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(0, self.n_rows, (n,), generator=generator)
        return self.quantization.dequantize(self.images[rows], generator)

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an image data set has no known density")

    def _exact_entropy(self) -> float | None:
        return None

    def _check_points(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            fail("x", "must be a torch.Tensor", type(x).__name__)
        if not x.is_floating_point():
            fail("x", "must be a floating-point tensor", str(x.dtype))
        if tuple(x.shape[1:]) != self.event_shape or x.dim() != 4:
            fail(
                "x",
                f"must have shape (n, {', '.join(map(str, self.event_shape))}) for data set "
                f"{self.name!r}",
                tuple(x.shape),
            )


def _check_pixels(images: np.ndarray | torch.Tensor, argument: str, levels: int) -> torch.Tensor:
    """Validate ``(n, C, H, W)`` integer pixels in ``[0, levels)``; return them as uint8/int16."""
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] < 3 or min(arr.shape[1:]) < 1:
        fail(argument, "must hold at least 3 images of shape (C, H, W)", tuple(arr.shape))
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        fail(argument, "must hold numeric pixel values", str(arr.dtype))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            fail(
                argument,
                f"must hold integer pixel values 0..{levels - 1} (discrete images; "
                "uint8 for 8-bit)",
                "non-integer values",
            )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= levels:
        fail(argument, f"must hold pixel values in 0..{levels - 1}", f"range {lo}..{hi}")
    dtype = np.uint8 if levels <= 256 else np.int32
    return torch.from_numpy(np.ascontiguousarray(arr.astype(dtype)))


def _check_labels(
    labels: np.ndarray | torch.Tensor | None, n: int, argument: str
) -> torch.Tensor | None:
    if labels is None:
        return None
    arr = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and int(arr.min()) < 0):
        fail(
            argument,
            f"labels must be {n} non-negative integers, one per image",
            f"shape {arr.shape}, dtype {arr.dtype}",
        )
    return torch.from_numpy(arr.astype(np.int64))


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped (``.gz``) or not.

    Format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C``
    int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then each dimension as a
    big-endian int32, then the data in row-major big-endian order.

    Raises:
        InputError: missing file, bad magic number or truncated data.
    """
    path = Path(path)
    argument = str(path)
    if not path.is_file():
        fail(argument, "must be an existing IDX file", str(path.resolve()))
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        fail(argument, "must be a readable (optionally gzipped) IDX file", str(err))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        fail(argument, "must start with an IDX magic number (0, 0, type code, ndim)", raw[:4].hex())
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        fail(argument, "must hold its dimensions after the magic number", f"{len(raw)} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:head], dtype=">i4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])  # type: ignore[call-overload]
    need = math.prod(shape) * dtype.itemsize
    if len(raw) - head != need:
        fail(argument, f"must hold {need} data bytes for shape {shape}", f"{len(raw) - head} bytes")
    return np.frombuffer(raw[head:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _as_nchw(arr: np.ndarray, argument: str) -> np.ndarray:
    """``(n, H, W)`` -> ``(n, 1, H, W)``; ``(n, H, W, C)`` with C in (1, 3) -> ``(n, C, H, W)``."""
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[1] in (1, 3):
            return arr
        if arr.shape[3] in (1, 3):
            return np.moveaxis(arr, 3, 1)
    fail(
        argument,
        "must hold images shaped (n, H, W), (n, C, H, W) or (n, H, W, C) with C = 1 or 3",
        tuple(arr.shape),
    )


def _idx_labels_path(images_path: Path) -> Path | None:
    name = images_path.name
    if "images-idx3" not in name:
        return None
    other = images_path.with_name(name.replace("images-idx3", "labels-idx1"))
    return other if other.is_file() else None


def load_idx_dataset(
    path: str | Path, *, name: str | None = None, value_range: tuple[float, float] = (0.0, 1.0)
) -> ImageDataset:
    """An image set from an IDX images file; labels from a sibling ``*labels-idx1*`` file."""
    path = Path(path)
    images = _as_nchw(read_idx(path), str(path))
    lab_path = _idx_labels_path(path)
    labels = read_idx(lab_path) if lab_path is not None else None
    return ImageDataset(
        images,
        name or path.name.split(".")[0],
        str(path.resolve()),
        labels=labels,
        value_range=value_range,
    )


def load_npy_dataset(
    path: str | Path, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> ImageDataset:
    """Integer images from a ``.npy`` file (``(n, H, W)``, ``(n, C, H, W)`` or ``(n, H, W, C)``).

    Pixels must be integers in ``0..255``; class labels are read from ``STEM_labels.npy`` next to it
    when that file exists.
    """
    path = Path(path)
    arr = load_npy(path)
    images = _as_nchw(arr, str(path))
    lab_path = path.with_name(f"{path.stem}_labels.npy")
    labels = load_npy(lab_path) if lab_path.is_file() else None
    return ImageDataset(
        images, path.stem, str(path.resolve()), labels=labels, value_range=value_range
    )


def load_folder_dataset(
    path: str | Path, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> ImageDataset:
    """Images from a folder of PNG/JPEG files, all of one size.

    Files directly in the folder are unlabelled; with one sub-folder per class (the usual
    "image folder" layout, sub-folders sorted by name) the sub-folder gives the label. Images are
    read as 8-bit grey unless some image has colour, in which case all are read as RGB.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    argument = str(root)
    if not root.is_dir():
        fail(argument, "must be an existing folder of images", str(root.resolve()))
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    pairs: list[tuple[Path, int | None]] = [
        (f, None) for f in sorted(root.iterdir()) if _is_image(f)
    ]
    for k, c in enumerate(classes):
        pairs += [(f, k) for f in sorted((root / c).iterdir()) if _is_image(f)]
    if len(pairs) < 3:
        fail(
            argument,
            f"must hold at least 3 images ({', '.join(IMAGE_SUFFIXES)})",
            f"{len(pairs)} found",
        )
    labelled = [k is not None for _, k in pairs]
    if any(labelled) and not all(labelled):
        fail(
            argument,
            "must hold images either directly or in class sub-folders, not both",
            str(root),
        )
    pics = []
    for f, _ in pairs:
        try:
            with Image.open(f) as img:
                pics.append(img.copy())
        except (OSError, UnidentifiedImageError) as err:
            fail(str(f), "must be a readable PNG/JPEG image", str(err))
    mode = (
        "L"
        if all(p.mode in ("1", "L", "LA", "I;16", "I", "P") and _is_grey(p) for p in pics)
        else "RGB"
    )
    arrs = [np.asarray(p.convert(mode)) for p in pics]
    size = arrs[0].shape
    for (f, _), a in zip(pairs, arrs, strict=True):
        if a.shape != size:
            fail(str(f), f"must have the size {size} of {pairs[0][0].name}", a.shape)
    stacked = np.stack(arrs)
    images = stacked[:, None] if mode == "L" else np.moveaxis(stacked, 3, 1)
    labels = np.array([k for _, k in pairs], dtype=np.int64) if all(labelled) else None
    return ImageDataset(
        images,
        root.name,
        str(root.resolve()),
        labels=labels,
        value_range=value_range,
        class_names=tuple(classes) if labels is not None else None,
    )


def _is_image(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES


def _is_grey(img: Any) -> bool:
    if img.mode != "P":
        return True
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def is_idx_path(path: Path) -> bool:
    """True for file names of IDX files (``*-ubyte``, ``*-ubyte.gz``, ``*.idx``, ``*.idx.gz``)."""
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(("-ubyte", ".idx")) or re.search(r"-idx\d-", name) is not None


def image_dataset_from_path(spec: str | os.PathLike[str]) -> ImageDataset | None:
    """The image data set a path names, or ``None`` when the path is not an image source.

    Image sources: an IDX file (:func:`is_idx_path`), a folder (of images or class sub-folders),
    or a ``.npy`` file holding a 3-D or 4-D array. A 2-D ``.npy`` table is not an image source.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder_dataset(path)
    if is_idx_path(path) and path.is_file():
        return load_idx_dataset(path)
    if path.suffix.lower() == ".npy" and path.is_file():
        try:
            ndim = np.load(path, mmap_mode="r", allow_pickle=False).ndim
        except (OSError, ValueError, EOFError):
            return None  # let the table reader report the problem
        return load_npy_dataset(path) if ndim >= 3 else None
    return None


# ------------------------------------------------------------------------------------------------
# built-in sets
# ------------------------------------------------------------------------------------------------


def digits8() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits: 1797 images ``(1, 8, 8)``, 17 grey levels, 10 classes."""
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    images = np.asarray(bunch.images, dtype=np.int64)[:, None]  # (1797, 1, 8, 8), values 0..16
    return ImageDataset(
        images,
        "digits8",
        "sklearn.datasets.load_digits",
        labels=bunch.target,
        levels=17,
        class_names=tuple(str(k) for k in range(10)),
    )


def fashion_mnist_dir() -> Path:
    """Folder of the Fashion-MNIST IDX files: ``$ITERFLOW_FASHION_MNIST_DIR`` or Debian's path."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def fashion_mnist(size: int = 28) -> ImageDataset:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv 1708.07747): 60k + 10k images ``(1, 28, 28)``.

    Arguments:
        size: 28, or 14 (2x2 means rounded to the nearest grey level: a new 8-bit data set).

    Raises:
        InputError: the files are absent (says how to install them).
    """
    root = fashion_mnist_dir()
    files = {}
    for part in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            base = root / f"{part}-{kind}-ubyte"
            found = [p for p in (base.with_name(base.name + ".gz"), base) if p.is_file()]
            if not found:
                fail(
                    "data",
                    "fashion-mnist needs its IDX files: install them with `sudo apt-get install "
                    f"dataset-fashion-mnist` (Debian/Ubuntu) or set {FASHION_MNIST_ENV} to a "
                    f"folder holding {part}-{kind}-ubyte.gz",
                    str(base) + "[.gz]",
                )
            files[(part, kind)] = found[0]
    train_x = read_idx(files[("train", "images-idx3")])[:, None]
    test_x = read_idx(files[("t10k", "images-idx3")])[:, None]
    if size == 14:
        train_x, test_x = _pool2(train_x), _pool2(test_x)
    elif size != 28:
        fail("size", "must be 28 or 14", size)
    name = "fashion-mnist" if size == 28 else "fashion-mnist-14"
    return ImageDataset(
        train_x,
        name,
        str(root),
        labels=read_idx(files[("train", "labels-idx1")]),
        test_images=test_x,
        test_labels=read_idx(files[("t10k", "labels-idx1")]),
        class_names=FASHION_MNIST_CLASSES,
    )


def _pool2(x: np.ndarray) -> np.ndarray:
    """2x2 mean pooling of ``(n, C, H, W)`` uint8 images, rounded half up to the nearest level."""
    n, c, h, w = x.shape
    s = (
        x[:, :, : h // 2 * 2, : w // 2 * 2]
        .astype(np.int32)
        .reshape(n, c, h // 2, 2, w // 2, 2)
        .sum((3, 5))
    )
    return ((s + 2) // 4).astype(np.uint8)


def _fashion_mnist_14() -> ImageDataset:
    return fashion_mnist(14)


IMAGE_SETS = {
    "digits8": digits8,
    "fashion-mnist": fashion_mnist,
    "fashion-mnist-14": _fashion_mnist_14,
}

__all__ = [
    "IMAGE_SETS",
    "ImageDataset",
    "Quantization",
    "digits8",
    "fashion_mnist",
    "image_dataset_from_path",
    "load_folder_dataset",
    "load_idx_dataset",
    "load_npy_dataset",
    "read_idx",
]
