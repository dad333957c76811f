"""Image data sets: discrete pixels, uniformly dequantized and scaled to a continuous range.

Sources: MNIST-format IDX files (gzipped or not), folders of PNG/JPEG images (one sub-folder per
class gives labels), ``.npy`` arrays of integer pixels, scikit-learn's bundled 8x8 digits
(``"digits8"``, 17 grey levels) and Fashion-MNIST from the files of Debian's
``dataset-fashion-mnist`` package (``"fashion-mnist"``, and ``"fashion-mnist-14"`` downsampled to
14x14).

This module gathers the public names of the image data sets from the modules that hold them:

- :mod:`iterflow.data.image_dataset`: :class:`ImageDataset` and its :class:`Quantization` (the
  dequantization ``s = low + (high - low) (x + u) / K``, ``u ~ U[0, 1)^D``);
- :mod:`iterflow.data.image_files`: readers of IDX files, image folders and ``.npy`` arrays
  (:func:`image_dataset_from_path`);
- :mod:`iterflow.data.image_sets`: the built-in sets (:data:`IMAGE_SETS`).
"""

from __future__ import annotations

from iterflow.data.image_dataset import ImageDataset, Quantization
from iterflow.data.image_files import (
    IMAGE_SUFFIXES,
    image_dataset_from_path,
    is_idx_path,
    load_folder_dataset,
    load_idx_dataset,
    load_npy_dataset,
    read_idx,
)
from iterflow.data.image_sets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    IMAGE_SETS,
    digits8,
    fashion_mnist,
    fashion_mnist_dir,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "IMAGE_SETS",
    "IMAGE_SUFFIXES",
    "ImageDataset",
    "Quantization",
    "digits8",
    "fashion_mnist",
    "fashion_mnist_dir",
    "image_dataset_from_path",
    "is_idx_path",
    "load_folder_dataset",
    "load_idx_dataset",
    "load_npy_dataset",
    "read_idx",
]
