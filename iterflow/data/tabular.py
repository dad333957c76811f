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
"""scikit-learn loaders that ship their data (no download); features only."""


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
    """

    finite = True
    has_log_prob = False

    def __init__(self, rows: np.ndarray | torch.Tensor, name: str, source: str) -> None:
        arr = _check_table(np.asarray(rows, dtype=np.float64), name)
        self.rows = torch.from_numpy(arr).to(torch.float32)  # (n, d)
        self.name, self.dim, self.source = name, int(arr.shape[1]), source

    @property
    def n_rows(self) -> int:
        """Number of rows in the table."""
        return int(self.rows.shape[0])

    def splits(self, n_train: int, n_val: int, n_test: int, seed: int) -> Splits:
        """Disjoint train/val/test rows after a shuffle seeded with ``seed``.

        ``test`` and ``val`` take about 10% of the rows each (at least 1, at most ``n_test`` /
        ``n_val``); ``train`` takes the rest, at most ``n_train``.
        """
        n_train, n_val, n_test = check_split_sizes(n_train, n_val, n_test)
        order = torch.randperm(self.n_rows, generator=seeded_generator(check_seed(seed)))
        tenth = max(1, round(0.1 * self.n_rows))
        k_test, k_val = min(n_test, tenth), min(n_val, tenth)
        k_train = min(n_train, self.n_rows - k_test - k_val)
        test = self.rows[order[:k_test]]
        val = self.rows[order[k_test : k_test + k_val]]
        train = self.rows[order[k_test + k_val : k_test + k_val + k_train]]
        return Splits(train.clone(), val.clone(), test.clone())

    def describe(self) -> dict[str, Any]:
        """Name, dim, finite, source, has_log_prob and the number of rows."""
        return {
            "name": self.name,
            "dim": self.dim,
            "finite": True,
            "source": self.source,
            "has_log_prob": False,
            "n_rows": self.n_rows,
        }

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.rows[torch.randint(0, self.n_rows, (n,), generator=generator)]

    def _log_density(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a finite table has no known density")

    def _exact_entropy(self) -> float | None:
        return None


def load_file_dataset(path: str | Path) -> ArrayDataset:
    """A finite data set from a ``.npy`` / ``.csv`` file (see :func:`load_array`)."""
    path = Path(path)
    return ArrayDataset(load_array(path), name=path.stem, source=str(path.resolve()))


def sklearn_dataset(name: str) -> ArrayDataset:
    """Features of one of scikit-learn's bundled sets (``iris``, ``wine``, ``breast_cancer``, ...).

    Raises:
        InputError: (argument ``"data"``) for a name outside :data:`SKLEARN_SETS`.
    """
    if name not in SKLEARN_SETS:
        fail("data", f"must be one of {[f'sklearn:{s}' for s in SKLEARN_SETS]}", f"sklearn:{name}")
    import sklearn.datasets

    features = getattr(sklearn.datasets, f"load_{name}")(return_X_y=True)[0]
    return ArrayDataset(
        np.asarray(features, dtype=np.float64), f"sklearn:{name}", f"sklearn:{name}"
    )
