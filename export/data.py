"""Toy data sets and splits for training flows."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import make_moons


def two_moons(n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """``n`` points of the two-moons data set, float32 ``[n, 2]``, not standardised."""
    points, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    return points.astype(np.float32)


def train_test_split(
    data: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle the rows of ``data`` with ``seed`` and split off ``test_fraction`` of them."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    num_test = int(round(len(data) * test_fraction))
    if num_test == 0 or num_test == len(data):
        raise ValueError(f"{len(data)} rows are too few to split with test_fraction={test_fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    return data[order[num_test:]], data[order[:num_test]]


def summarize(data: np.ndarray) -> dict[str, Any]:
    """Row count, dimension and per-feature mean and standard deviation, as plain values."""
    return {
        "n": int(data.shape[0]),
        "dim": int(data.shape[1]),
        "mean": [float(value) for value in data.mean(axis=0)],
        "std": [float(value) for value in data.std(axis=0)],
    }


DATASETS = {"moons": two_moons}
"""Built-in data sets by name: each takes (n, seed=...) and returns float32 [n, D]."""
