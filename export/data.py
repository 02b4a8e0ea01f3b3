"""Data sets for training flows: 2-D toys, a tabular set, 8x8 digits, and user files.

Everything here is generated or shipped with scikit-learn, so nothing is downloaded.
scikit-learn is imported when a set is generated, so the registry's names (the CLI's
choices) cost nothing to import.
:func:`load_dataset` is the entry point: it returns a :class:`Dataset` with a seeded
train/held-out split, for a built-in name (see :data:`DATASETS`) or for a user's ``.npy``
or ``.csv`` file holding an ``[N, D]`` array.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOY_POINTS = 4000
"""Rows drawn for a generated (toy) data set when ``num_points`` is not given."""

DIGIT_LEVELS = 17
"""``load_digits`` pixels are integers 0..16: 17 discrete levels."""

MIN_USER_ROWS = 10
USER_SUFFIXES = (".npy", ".csv")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set split into training and held-out rows.

    ``train`` and ``test`` are float32 ``[N, *event_shape]``. ``train_context`` and
    ``test_context`` are float32 ``[N, C]`` (e.g. one-hot labels) for conditional data,
    else None. ``levels`` is the number of discrete values of pixel data that must be
    dequantized before fitting a density (17 for digits: values 0..16); None for
    continuous data.
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    event_shape: tuple[int, ...]
    train_context: np.ndarray | None = None
    test_context: np.ndarray | None = None
    levels: int | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            rows = getattr(self, split)
            if rows.dtype != np.float32 or tuple(rows.shape[1:]) != tuple(self.event_shape):
                raise ValueError(
                    f"dataset {self.name!r}: {split} is {rows.dtype} {list(rows.shape)}, "
                    f"expected float32 [N, {', '.join(map(str, self.event_shape))}]"
                )
            context = getattr(self, f"{split}_context")
            if (context is None) != (self.train_context is None):
                raise ValueError(f"dataset {self.name!r}: train_context and test_context must both be set or None")
            if context is not None and (context.dtype != np.float32 or context.ndim != 2 or len(context) != len(rows)):
                raise ValueError(
                    f"dataset {self.name!r}: {split}_context is {context.dtype} {list(context.shape)}, "
                    f"expected float32 [{len(rows)}, C]"
                )

    @property
    def dim(self) -> int:
        """Number of values per example: the product of ``event_shape``."""
        return math.prod(self.event_shape)

    @property
    def context_dim(self) -> int:
        """Columns of the context; 0 for unconditional data."""
        return 0 if self.train_context is None else int(self.train_context.shape[1])


# ---------------------------------------------------------------------------------------
# Generators. Each returns float32 rows; toys take (n, seed) and are deterministic in seed.


def two_moons(n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """``n`` points of the two-moons data set, float32 ``[n, 2]``, not standardised."""
    from sklearn.datasets import make_moons

    points, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return points.astype(np.float32)


def circles(n: int, noise: float = 0.05, factor: float = 0.5, seed: int = 0) -> np.ndarray:
    """``n`` points on two noisy concentric circles (radii 1 and ``factor``), float32 ``[n, 2]``."""
    from sklearn.datasets import make_circles

    points, _ = make_circles(n_samples=n, noise=noise, factor=factor, random_state=seed)
    return points.astype(np.float32)


def eight_gaussians(n: int, scale: float = 4.0, std: float = 0.5, seed: int = 0) -> np.ndarray:
    """A mixture of 8 equal Gaussians (std ``std``) on a circle of radius ``scale``, divided
    by sqrt(2) (the FFJORD toy), float32 ``[n, 2]``."""
    rng = np.random.default_rng(seed)
    angles = np.arange(8) * (np.pi / 4)
    centers = scale * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points = centers[rng.integers(0, 8, size=n)] + std * rng.standard_normal((n, 2))
    return (points / math.sqrt(2.0)).astype(np.float32)


def checkerboard(n: int, seed: int = 0) -> np.ndarray:
    """Uniform density on the 8 dark squares of a 4x4 checkerboard over [-4, 4]^2 (the
    FFJORD toy), float32 ``[n, 2]``."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(-2.0, 2.0, size=n)
    x2 = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x1) % 2
    return (2.0 * np.stack([x1, x2], axis=1)).astype(np.float32)


def gaussian_linear(n: int, dim: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Simulation-based inference's Gaussian linear task: parameters ``theta ~ N(0, 0.1 I)``
    and an observation ``x ~ N(theta, 0.1 I)`` of each, float32 ``[n, dim]`` both. A model
    of theta given x as its context learns the posterior, known exactly:
    ``N(x / 2, 0.05 I)``."""
    rng = np.random.default_rng(seed)
    theta = math.sqrt(0.1) * rng.standard_normal((n, dim))
    x = theta + math.sqrt(0.1) * rng.standard_normal((n, dim))
    return theta.astype(np.float32), x.astype(np.float32)


def breast_cancer() -> np.ndarray:
    """The 569 x 30 Wisconsin breast-cancer features (labels dropped), float32, raw units.

    Chosen as the tabular set because a flow can learn a lot from its few hundred rows:
    the features are strongly correlated (radius, perimeter and area of each statistic are
    nearly collinear; the smallest covariance eigenvalue of the standardised data is about
    1e-4), so a full-covariance Gaussian already scores about 30 nats per row above a
    diagonal one, while every feature is continuous (hundreds of distinct values each).
    ``load_diabetes`` was rejected: its ``sex`` column takes two values, so a density
    model can drive the likelihood up without bound on it; ``load_wine`` has 178 rows.
    The features are not standardised here: flows carry that in their preprocessing.
    """
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer().data.astype(np.float32)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digit images as raw pixel values 0..16, float32 ``[N, 1, 8, 8]``, and
    their labels 0..9 (int64 ``[N]``)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32)[:, None, :, :], bunch.target.astype(np.int64)


def dequantize(rows: np.ndarray, seed: int) -> np.ndarray:
    """Pixel ``rows`` plus ``u ~ U[0, 1)`` drawn with ``seed``: float64, same shape."""
    rng = np.random.default_rng(seed)
    return np.asarray(rows, dtype=np.float64) + rng.random(np.shape(rows))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 ``[N, num_classes]`` one-hot rows of integer ``labels``."""
    return np.eye(num_classes, dtype=np.float32)[labels]


# ---------------------------------------------------------------------------------------
# Splits and summaries.


def _split_order(num_rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the training and held-out parts of a seeded shuffle."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    num_test = int(round(num_rows * test_fraction))
    if num_test == 0 or num_test == num_rows:
        raise ValueError(f"{num_rows} rows are too few to split with test_fraction={test_fraction}")
    order = np.random.default_rng(seed).permutation(num_rows)
    return order[num_test:], order[:num_test]


def train_test_split(
    data: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the rows of ``data`` with ``seed`` and split off ``test_fraction`` of them."""
    train_rows, test_rows = _split_order(len(data), test_fraction, seed)
    return data[train_rows], data[test_rows]


@dataclass(frozen=True, eq=False)
class ValidationSplit:
    """A data set's training rows split into the rows a model trains on and the validation
    rows that choose among its weights (None: nothing held back)."""

    train: np.ndarray
    train_context: np.ndarray | None
    validation: np.ndarray | None
    validation_context: np.ndarray | None


def validation_split(dataset: Dataset, fraction: float, seed: int = 0) -> ValidationSplit:
    """A seeded ``fraction`` of ``dataset.train`` as validation rows; the test rows are not
    touched. ``fraction`` 0 holds nothing back."""
    if fraction == 0:
        return ValidationSplit(dataset.train, dataset.train_context, None, None)
    if not 0 < round(len(dataset.train) * fraction) < len(dataset.train):
        raise ValueError(f"{len(dataset.train)} training rows are too few to hold back a validation fraction of "
                         f"{fraction}; use validation fraction 0")
    kept, held = _split_order(len(dataset.train), fraction, seed)
    context = dataset.train_context
    return ValidationSplit(dataset.train[kept], None if context is None else context[kept],
                           dataset.train[held], None if context is None else context[held])


def summarize(data: np.ndarray) -> dict[str, Any]:
    """Row count, dimension and per-feature mean and standard deviation, as plain values.

    Rows of any event shape are flattened: ``dim`` is the number of values per row.
    """
    flat = np.asarray(data).reshape(len(data), -1)
    return {
        "n": int(flat.shape[0]),
        "dim": int(flat.shape[1]),
        "mean": [float(value) for value in flat.mean(axis=0)],
        "std": [float(value) for value in flat.std(axis=0)],
    }


# ---------------------------------------------------------------------------------------
# Registry and loading.


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in data set: ``load(num_points, seed)`` returns ``(rows, context | None)``."""

    description: str
    load: Callable[[int | None, int], tuple[np.ndarray, np.ndarray | None]]
    levels: int | None = None


def _toy(generate: Callable[..., np.ndarray]) -> Callable[[int | None, int], tuple[np.ndarray, None]]:
    def load(num_points: int | None, seed: int) -> tuple[np.ndarray, None]:
        return generate(DEFAULT_TOY_POINTS if num_points is None else num_points, seed=seed), None

    return load


def _subsample(rows: np.ndarray, context: np.ndarray | None, num_points: int | None, seed: int, name: str):
    """A seeded subset of ``num_points`` rows of a fixed data set (all of them if None)."""
    if num_points is None or num_points == len(rows):
        return rows, context
    if num_points > len(rows):
        raise ValueError(f"{name} has {len(rows)} rows; cannot take num_points={num_points}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(rows))[:num_points])
    return rows[keep], None if context is None else context[keep]


def _load_breast_cancer(num_points: int | None, seed: int) -> tuple[np.ndarray, None]:
    return _subsample(breast_cancer(), None, num_points, seed, "breast-cancer")


def _load_digits(num_points: int | None, seed: int) -> tuple[np.ndarray, None]:
    return _subsample(digits()[0], None, num_points, seed, "digits")


def _load_digits_conditional(num_points: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits()
    return _subsample(images, one_hot(labels, 10), num_points, seed, "digits-conditional")


def _load_gaussian_linear(num_points: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return gaussian_linear(DEFAULT_TOY_POINTS if num_points is None else num_points, seed=seed)


DATASETS: dict[str, BuiltinDataset] = {
    "moons": BuiltinDataset("two interleaving half circles, 2-D", _toy(two_moons)),
    "circles": BuiltinDataset("two concentric circles, 2-D", _toy(circles)),
    "8gaussians": BuiltinDataset("mixture of 8 Gaussians on a circle, 2-D", _toy(eight_gaussians)),
    "checkerboard": BuiltinDataset("uniform on a 4x4 checkerboard's dark squares, 2-D", _toy(checkerboard)),
    "breast-cancer": BuiltinDataset("Wisconsin breast-cancer features, 569 x 30, correlated", _load_breast_cancer),
    "digits": BuiltinDataset("8x8 digit images, pixels 0..16, event shape (1, 8, 8)", _load_digits,
                             levels=DIGIT_LEVELS),
    "digits-conditional": BuiltinDataset("8x8 digits with the one-hot label (10 columns) as context",
                                         _load_digits_conditional, levels=DIGIT_LEVELS),
    "gaussian-linear": BuiltinDataset("simulation-based inference's Gaussian linear task: parameters (10) given "
                                      "their noisy observation (10) as context", _load_gaussian_linear),
}
"""Built-in data sets by name."""

TOY_DATASETS = ("moons", "circles", "8gaussians", "checkerboard")
TABULAR_DATASET = "breast-cancer"


def is_user_data(name: str | Path) -> bool:
    """Whether ``name`` names a user file (``.npy`` or ``.csv``) rather than a built-in."""
    return Path(name).suffix.lower() in USER_SUFFIXES


def load_dataset(
    name: str | Path, num_points: int | None = None, seed: int = 0, test_fraction: float = 0.2
) -> Dataset:
    """A built-in data set (a key of :data:`DATASETS`) or a user ``.npy``/``.csv`` file.

    ``num_points`` is the size before the held-out split: the number of generated rows for
    toys (default ``DEFAULT_TOY_POINTS``), a seeded subset for fixed data sets and user
    files (default all rows). ``seed`` drives generation, subsetting and the split.
    A ``Path`` (or a string ending in ``.npy``/``.csv``) is a user file: it is read by
    :func:`read_user_array` and the data set is named after the file stem.
    """
    if num_points is not None and num_points < 2:
        raise ValueError(f"num_points must be at least 2, got {num_points}")
    if isinstance(name, str) and name in DATASETS:
        spec = DATASETS[name]
        rows, context = spec.load(num_points, seed)
        levels = spec.levels
        dataset_name = name
    elif isinstance(name, Path) or is_user_data(name):
        path = Path(name)
        rows, context = _subsample(read_user_array(path), None, num_points, seed, str(path))
        levels = None
        dataset_name = path.stem
    else:
        raise ValueError(
            f"unknown data set {str(name)!r}: use one of {', '.join(DATASETS)} or a .npy/.csv file"
        )
    train_rows, test_rows = _split_order(len(rows), test_fraction, seed)
    return Dataset(
        name=dataset_name,
        train=np.ascontiguousarray(rows[train_rows]),
        test=np.ascontiguousarray(rows[test_rows]),
        event_shape=tuple(int(size) for size in rows.shape[1:]),
        train_context=None if context is None else np.ascontiguousarray(context[train_rows]),
        test_context=None if context is None else np.ascontiguousarray(context[test_rows]),
        levels=levels,
    )


# ---------------------------------------------------------------------------------------
# User files.


def read_user_array(path: str | Path) -> np.ndarray:
    """Read and validate a user's ``[N, D]`` array from ``.npy`` or ``.csv``; float32.

    CSV files are comma-separated numbers, one row per line; a first line made only of
    non-numeric names is a header and is skipped; blank lines are skipped. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the problem for a
    file that cannot be read, an array that is not 2-D, non-numeric or non-finite values
    (with the row index), or fewer than ``MIN_USER_ROWS`` rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in USER_SUFFIXES:
        raise ValueError(f"{path}: user data must be a .npy or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    array = _read_npy(path) if suffix == ".npy" else _read_csv(path)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array [N, D], got shape {list(array.shape)}")
    if array.shape[1] == 0:
        raise ValueError(f"{path}: rows have no columns (shape {list(array.shape)})")
    if len(array) < MIN_USER_ROWS:
        raise ValueError(f"{path}: {len(array)} rows; at least {MIN_USER_ROWS} are needed for a held-out split")
    with np.errstate(over="ignore", invalid="ignore"):
        rows = array.astype(np.float32)
    bad = ~np.isfinite(rows)
    if bad.any():
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{path}: non-finite value {array[row, column]!r} at row {row}, column {column} "
            f"(row index counts data rows from 0; values must be finite in float32)"
        )
    return rows


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read as a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path}: holds {type(array).__name__}, not a single array")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_) or np.iscomplexobj(array):
        raise ValueError(f"{path}: dtype {array.dtype} is not real numbers")
    return array


def _parse_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: Path) -> np.ndarray:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            lines = [(number, row) for number, row in enumerate(csv.reader(handle), start=1)
                     if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise ValueError(f"{path}: cannot read as comma-separated text: {exc}") from exc
    if lines and all(_parse_number(cell) is None for cell in lines[0][1]):
        lines = lines[1:]  # a header of column names
    if not lines:
        raise ValueError(f"{path}: no data rows")
    width = len(lines[0][1])
    values = []
    for index, (line_number, cells) in enumerate(lines):
        if len(cells) != width:
            raise ValueError(
                f"{path}: not a 2-D table: row {index} (line {line_number}) has {len(cells)} columns, "
                f"the first row has {width}"
            )
        row = []
        for column, cell in enumerate(cells):
            number = _parse_number(cell)
            if number is None:
                raise ValueError(
                    f"{path}: row {index} (line {line_number}), column {column}: {cell.strip()!r} is not a number"
                )
            row.append(number)
        values.append(row)
    return np.asarray(values, dtype=np.float64)
