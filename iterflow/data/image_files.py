"""Image sources on disk: IDX files (the MNIST format), folders of PNG/JPEG images, ``.npy`` arrays.

Each reader returns an :class:`~iterflow.data.image_dataset.ImageDataset` of integer pixels; a
folder with one sub-folder per class gives labels, as does a ``*labels-idx1*`` file next to an IDX
images file or ``STEM_labels.npy`` next to a ``.npy`` array. :func:`image_dataset_from_path` picks
the reader a path calls for.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from iterflow.data.image_dataset import ImageDataset
from iterflow.data.tabular import load_npy
from iterflow.errors import fail

__all__ = [
    "IMAGE_SUFFIXES",
    "image_dataset_from_path",
    "is_idx_path",
    "load_folder_dataset",
    "load_idx_dataset",
    "load_npy_dataset",
    "read_idx",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
