"""Finite data sets: user tables (``.npy`` / ``.csv``) and scikit-learn's bundled tabular sets.

Rows are kept in their own units (no standardisation, no jitter); the density is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from iterflow.data.base import Dataset, Splits, check_seed, check_split_sizes, seeded_generator
from iterflow.errors import check_finite, fail

MIN_ROWS = 3
SKLEARN_SETS = ("iris", "wine", "breast_cancer", "diabetes", "digits")
"""scikit-learn loaders that ship their data (no download); the classification sets (all but
``diabetes``) with their class labels."""


def load_array(path: str | Path) -> np.ndarray:
    """Read a table of numbers from ``.npy`` or ``.csv``.

    CSV files are comma or whitespace separated; a first line of non-numeric column names is
    skipped; blank lines and ``#`` comments are ignored.

    Args:
        path: the file.

    Returns:
        ``(n, d)`` float64 array, ``n >= 3``, all finite.

    Raises:
        InputError: (argument = the path) missing or empty file, unknown suffix, unparsable content,
            not a 2-D array, fewer than 3 rows, or NaN/inf entries.
    """
    path = Path(path)
    return _check_table(read_table(path), str(path))


def read_table(path: str | Path, argument: str | None = None) -> np.ndarray:
    """The numbers of a ``.npy`` or ``.csv`` file as float64, without :func:`load_array`'s checks
    of the row count and of finite values (for callers that check rows themselves and name them,
    such as ``iterflow score``).

    A ``.npy`` file keeps its shape (never unpickled); a ``.csv`` file is read as by
    :func:`load_array` into ``(n, d)``, and a row of another width or a field that is not a number
    is named by its index among the data rows (0-based, after any header) and its line in the file.

    Args:
        path: the file.
        argument: the name errors give (default: the path).

    Raises:
        InputError: missing or empty file, unknown suffix, unreadable or unparsable content.
    """
    path = Path(path)
    argument = str(path) if argument is None else argument
    if not path.is_file():
        fail(argument, "must be an existing file", str(path.resolve()))
    if path.stat().st_size == 0:
        fail(argument, "must not be empty", "0 bytes")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, argument)
    if suffix == ".csv":
        return _read_csv(path, argument)
    fail(argument, "must end in .npy or .csv", path.suffix or "no suffix")


def load_npy(path: Path, argument: str | None = None) -> np.ndarray:
    """One array from a ``.npy`` file, never unpickling; errors name the file (or ``argument``)
    and the rule."""
    argument = str(path) if argument is None else argument
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        fail(
            argument,
            "must be a readable .npy file (saved with numpy.save, no pickled objects)",
            str(err),
        )
    if not isinstance(arr, np.ndarray):
        fail(argument, "must hold a single array (.npy, not .npz)", type(arr).__name__)
    return arr


def _read_npy(path: Path, argument: str) -> np.ndarray:
    arr = load_npy(path, argument)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        fail(argument, "must hold real numbers (integer or floating dtype)", str(arr.dtype))
    return arr.astype(np.float64)


def _read_csv(path: Path, argument: str) -> np.ndarray:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        fail(argument, "must be a readable text (CSV) file", str(err))
    numbered = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    numbered = [(i, ln) for i, ln in numbered if ln and not ln.startswith("#")]
    if not numbered:
        fail(argument, "must contain at least one row of numbers", "only blank or comment lines")
    delimiter = "," if "," in numbered[0][1] else None
    if _is_header(numbered[0][1], delimiter):
        numbered = numbered[1:]
    if not numbered:
        fail(argument, "must contain rows of numbers after the header line", "a header only")
    try:
        return np.loadtxt(
            [ln for _, ln in numbered], delimiter=delimiter, dtype=np.float64, ndmin=2
        )
    except ValueError as err:
        where = _first_bad_row(numbered, delimiter) or str(err)
        fail(argument, "must contain only numbers, the same count on every row", where)


def _first_bad_row(numbered: list[tuple[int, str]], delimiter: str | None) -> str | None:
    """Where a CSV body first breaks: ``row i (line L) ...``, ``i`` counting data rows from 0."""
    width = None
    for row, (line_no, line) in enumerate(numbered):
        fields = line.split(delimiter)
        width = len(fields) if width is None else width
        if len(fields) != width:
            return f"row {row} (line {line_no}) has {len(fields)} values, row 0 has {width}"
        for col, field in enumerate(fields):
            try:
                float(field)
            except ValueError:
                return (
                    f"row {row} (line {line_no}), column {col}: {field.strip()!r} is not a number"
                )
    return None


def _is_header(line: str, delimiter: str | None) -> bool:
    """True when some field of ``line`` is not a number (a row of column names)."""
    for field in line.split(delimiter):
        try:
            float(field)
        except ValueError:
            return True
    return False


def _check_table(arr: np.ndarray, argument: str) -> np.ndarray:
    if arr.ndim != 2:
        fail(argument, "must be a 2-D array (n, d)", f"shape {arr.shape}")
    if arr.shape[1] < 1:
        fail(argument, "must have at least 1 column", f"shape {arr.shape}")
    if arr.shape[0] < MIN_ROWS:
        fail(argument, f"must have at least {MIN_ROWS} rows", f"{arr.shape[0]} rows")
    check_finite(arr, argument)
    return np.ascontiguousarray(arr, dtype=np.float64)


class ArrayDataset(Dataset):
    """A fixed table of rows (``finite``): sampling draws rows with replacement; no density.

    Args:
        rows: ``(n, d)`` array, ``n >= 3``, finite.
        name: data set name.
        source: where the rows came from (a path or ``"sklearn:NAME"``).
        labels: ``(n,)`` class labels in ``[0, K)`` (:meth:`label_splits`), or ``None``.
        class_names: the names of the ``K`` classes (optional).
    """

    finite = True
    has_log_prob = False

    def __init__(
        self,
        rows: np.ndarray | torch.Tensor,
        name: str,
        source: str,
        *,
        labels: np.ndarray | torch.Tensor | None = None,
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        arr = _check_table(np.asarray(rows, dtype=np.float64), name)
        self.rows = torch.from_numpy(arr).to(torch.float32)  # (n, d)
        self.name, self.dim, self.source = name, int(arr.shape[1]), source
        self.labels: torch.Tensor | None = None
        if labels is not None:
            lab = np.asarray(labels)
            if lab.shape != (arr.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
                fail(name, f"labels must be {arr.shape[0]} integers, one per row", lab.shape)
            if lab.min() < 0:
                fail(name, "labels must be >= 0", int(lab.min()))
            self.labels = torch.from_numpy(lab.astype(np.int64))
        self.class_names = class_names

    @property
    def n_rows(self) -> int:
        """Number of rows in the table."""
        return int(self.rows.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (``max label + 1``; 0 without labels)."""
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def _split_rows(self, n_train: int, n_val: int, n_test: int, seed: int) -> list[torch.Tensor]:
        """Row indices of train, val and test."""
        n_train, n_val, n_test = check_split_sizes(n_train, n_val, n_test)
        order = torch.randperm(self.n_rows, generator=seeded_generator(check_seed(seed)))
        tenth = max(1, round(0.1 * self.n_rows))
        k_test, k_val = min(n_test, tenth), min(n_val, tenth)
        k_train = min(n_train, self.n_rows - k_test - k_val)
        return [
            order[k_test + k_val : k_test + k_val + k_train],
            order[k_test : k_test + k_val],
            order[:k_test],
        ]

    def splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Disjoint train/val/test rows after a shuffle seeded with ``seed``.

        ``test`` and ``val`` take about 10% of the rows each (at least 1, at most ``n_test`` /
        ``n_val``); ``train`` takes the rest, at most ``n_train``.
        """
        return Splits(
            *(self.rows[i].clone() for i in self._split_rows(n_train, n_val, n_test, seed))
        )

    def label_splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """The labels of the rows of :meth:`splits`."""
        if self.labels is None:
            return super().label_splits(n_train, n_val, n_test, seed)
        rows = self._split_rows(n_train, n_val, n_test, seed)
        return Splits(*(self.labels[i].clone() for i in rows))

    def describe(self) -> dict[str, Any]:
        """Name, dim, finite, source, has_log_prob and the number of rows (and the classes)."""
        out: dict[str, Any] = {
            "name": self.name,
            "dim": self.dim,
            "finite": True,
            "source": self.source,
            "has_log_prob": False,
            "n_rows": self.n_rows,
        }
        if self.labels is not None:
            out["num_classes"] = self.num_classes
            if self.class_names is not None:
                out["class_names"] = list(self.class_names)
        return out

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.rows[torch.randint(0, self.n_rows, (n,), generator=generator)]

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a finite table has no known density")

    def _exact_entropy(self) -> float | None:
        return None


def load_file_dataset(path: str | Path, label_column: str | int | None = None) -> ArrayDataset:
    """A finite data set from a ``.npy`` / ``.csv`` file (see :func:`load_array`).

    Args:
        path: the file.
        label_column: the column of class labels, if any: an index (negative: from the end) or,
            for a CSV file with a header line, a column name. Its distinct values, sorted, become
            the classes ``0..K-1`` (their text is recorded as ``class_names``); the other columns
            are the data.

    Raises:
        InputError: (argument ``label_column``) an unknown column, or a table of one column.
    """
    path = Path(path)
    table = load_array(path)
    if label_column is None or label_column == "":
        return ArrayDataset(table, name=path.stem, source=str(path.resolve()))
    col = _column_index(path, label_column, table.shape[1])
    if table.shape[1] < 2:
        fail("label_column", "needs a table with a data column besides the labels", table.shape)
    values, labels = np.unique(table[:, col], return_inverse=True)
    names = tuple(format(v, "g") for v in values)
    rows = np.delete(table, col, axis=1)
    return ArrayDataset(
        rows, name=path.stem, source=str(path.resolve()), labels=labels, class_names=names
    )


def _column_index(path: Path, column: str | int, width: int) -> int:
    """The index of ``column`` (an index, negative from the end, or a CSV header name)."""
    text = str(column).strip()
    try:
        index = int(text)
    except ValueError:
        header = csv_header(path) if path.suffix.lower() == ".csv" else None
        if header is None or text not in header:
            known = f"one of {header}" if header else "a column index"
            fail("label_column", f"must be {known} of {path.name}", text)
        return header.index(text)
    if not -width <= index < width:
        fail("label_column", f"must be a column index in [-{width}, {width})", index)
    return index % width


def csv_header(path: str | Path) -> list[str] | None:
    """The column names of a CSV file's header line (``None`` without one)."""
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        delimiter = "," if "," in line else None
        if not _is_header(line, delimiter):
            return None
        return [f.strip().strip('"') for f in line.split(delimiter)]
    return None


def sklearn_dataset(name: str) -> ArrayDataset:
    """Features of one of scikit-learn's bundled sets (``iris``, ``wine``, ``breast_cancer``, ...).

    Raises:
        InputError: (argument ``"data"``) for a name outside :data:`SKLEARN_SETS`.
    """
    if name not in SKLEARN_SETS:
        fail("data", f"must be one of {[f'sklearn:{s}' for s in SKLEARN_SETS]}", f"sklearn:{name}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    labelled = "target_names" in bunch  # classification sets: their targets are class labels
    return ArrayDataset(
        np.asarray(bunch.data, dtype=np.float64),
        f"sklearn:{name}",
        f"sklearn:{name}",
        labels=np.asarray(bunch.target) if labelled else None,
        class_names=tuple(str(c) for c in bunch.target_names) if labelled else None,
    )
