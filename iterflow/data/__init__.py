"""Data sets for flow models: seeded 2-D generators, explicit mixtures, image densities and tables.

Every data set is a :class:`Dataset`: ``sample(n, generator)`` draws ``(n, dim)`` float32 points,
``log_prob(x)`` gives the exact log density where one is known (``None`` otherwise), ``entropy()``
its differential entropy and ``splits(...)`` the train/val/test tensors a run uses.

Example:
    >>> import torch
    >>> from iterflow.data import get_dataset
    >>> data = get_dataset("checkerboard")
    >>> data.sample(4, torch.Generator().manual_seed(0)).shape
    torch.Size([4, 2])
    >>> round(data.entropy(), 4)  # log 32
    3.4657

The shared base classes live in :mod:`iterflow.data.base`; the registry :data:`DATASETS` is filled
explicitly here from the sub-modules' tables.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from iterflow.data.base import (
    Dataset,
    EntropyEstimate,
    GeneratedDataset,
    Splits,
    check_generator,
    check_seed,
    check_split_sizes,
    child_seeds,
    sample_categorical,
    seeded_generator,
)
from iterflow.data.image2d import ImageDensity, image_factory
from iterflow.data.image_files import image_dataset_from_path
from iterflow.data.image_sets import IMAGE_SETS
from iterflow.data.mixture import GaussianMixture, eight_gaussians, gmm_2d
from iterflow.data.tabular import (
    SKLEARN_SETS,
    ArrayDataset,
    load_array,
    load_file_dataset,
    read_table,
    sklearn_dataset,
)
from iterflow.data.toy2d import TOY_FACTORIES
from iterflow.errors import Registry, fail

DATASETS: Registry[Callable[..., Dataset]] = Registry("data set")
"""Name -> factory; ``DATASETS[name]()`` builds the data set (image sets accept ``img2d_dir=``)."""

_IMAGE_NAMES = {"rose": "img_rose.png", "tree": "img_tree.png"}
_FILE_SUFFIXES = (".npy", ".csv", ".png")


def _register_all() -> None:
    for name, factory in TOY_FACTORIES.items():
        DATASETS.register(name, factory)
    DATASETS.register("8gaussians", eight_gaussians)
    DATASETS.register("gmm-2d", gmm_2d)
    for name, file_name in _IMAGE_NAMES.items():
        DATASETS.register(name, image_factory(name, file_name))
    for name, factory in IMAGE_SETS.items():
        DATASETS.register(name, factory)
    for name in SKLEARN_SETS:
        DATASETS.register(f"sklearn:{name}", _sklearn_factory(name))


def _sklearn_factory(name: str) -> Callable[[], Dataset]:
    def factory() -> Dataset:
        return sklearn_dataset(name)

    factory.__name__ = f"sklearn_{name}"
    return factory


def get_dataset(
    spec: str | os.PathLike[str],
    *,
    img2d_dir: str | Path | None = None,
    label_column: str | int | None = None,
) -> Dataset:
    """Build a data set from a registered name or a data file.

    Args:
        spec: a name in :data:`DATASETS` (``"checkerboard"``, ``"rose"``, ``"sklearn:wine"``) or the
            path of an existing ``.npy`` / ``.csv`` table or ``.png`` image.
        img2d_dir: folder holding ``img_rose.png`` / ``img_tree.png`` for ``"rose"`` / ``"tree"``;
            default: ``$ITERFLOW_IMG2D_DIR``, else ``../shared/data/img2d`` next to the working
            directory or the repository root.
        label_column: for a ``.npy`` / ``.csv`` table: the column holding class labels (index or
            CSV header name; :func:`~iterflow.data.tabular.load_file_dataset`). Labelled sets
            (``num_classes > 0``, :meth:`Dataset.label_splits`) without it: ``moons``,
            ``pinwheel``, ``2spirals``, ``rings``, ``circles``, ``8gaussians``, ``gmm-2d``, the
            classification sets of ``sklearn:``, ``digits8``, ``fashion-mnist`` and image folders.

    Raises:
        InputError: (argument ``"data"``) for an unknown name or a missing/unsupported file.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        fail("data", "must be a data set name or a file path (a non-empty string)", spec)
    if label_column not in (None, ""):
        if spec in DATASETS.names() or Path(spec).suffix.lower() not in (".npy", ".csv"):
            fail("label_column", "is for .npy / .csv tables (labelled sets carry theirs)", spec)
        return load_file_dataset(_existing_file(spec), label_column)
    if spec in DATASETS.names():  # Registry lookups of unknown names raise, hence names()
        factory = DATASETS[spec]
        return factory(img2d_dir=img2d_dir) if spec in _IMAGE_NAMES else factory()
    return _dataset_from_path(spec)


def _existing_file(spec: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_file():
        fail("data", f"must be an existing file; no file at {str(path.resolve())!r}", spec)
    return path


def _dataset_from_path(spec: str) -> Dataset:
    path = Path(spec).expanduser()
    image_set = image_dataset_from_path(path)  # IDX files, image folders, .npy arrays of images
    if image_set is not None:
        return image_set
    known = f"must be one of {DATASETS.names()} or an existing .npy/.csv/.png file"
    if path.suffix.lower() in _FILE_SUFFIXES:
        if not path.is_file():
            fail("data", f"{known}; no file at {str(path.resolve())!r}", spec)
        if path.suffix.lower() == ".png":
            return ImageDensity(path)
        return load_file_dataset(path)
    if path.is_file():
        fail("data", "a data file must end in .npy, .csv or .png", spec)
    fail("data", known, spec)


_register_all()


__all__ = [
    "check_generator",
    "check_seed",
    "check_split_sizes",
    "child_seeds",
    "sample_categorical",
    "seeded_generator",
    "IMAGE_SETS",
    "load_file_dataset",
    "sklearn_dataset",
    "image_dataset_from_path",
    "DATASETS",
    "ArrayDataset",
    "Dataset",
    "EntropyEstimate",
    "GaussianMixture",
    "GeneratedDataset",
    "ImageDensity",
    "Splits",
    "get_dataset",
    "load_array",
    "read_table",
]
