"""The built-in image sets: scikit-learn's 8x8 digits and Fashion-MNIST (28x28 and 14x14).

``"digits8"`` is bundled with scikit-learn (17 grey levels); Fashion-MNIST is read from the IDX
files of Debian's ``dataset-fashion-mnist`` package (or ``$ITERFLOW_FASHION_MNIST_DIR``).
:data:`IMAGE_SETS` maps their names to factories; :mod:`iterflow.data` registers them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from iterflow.data.image_dataset import ImageDataset
from iterflow.data.image_files import read_idx
from iterflow.errors import fail

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "IMAGE_SETS",
    "digits8",
    "fashion_mnist",
    "fashion_mnist_dir",
]

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
