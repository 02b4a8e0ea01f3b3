"""Data sets: shapes, dtypes, seeding, digits' pixels and labels, user files and their errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowserve.export.data import (
    DATASETS,
    DEFAULT_TOY_POINTS,
    Dataset,
    load_dataset,
    read_user_array,
    summarize,
    train_test_split,
    two_moons,
)

TOYS = ["moons", "circles", "8gaussians", "checkerboard"]


def test_registry_names():
    assert set(DATASETS) == {*TOYS, "breast-cancer", "digits", "digits-conditional", "gaussian-linear"}


def test_gaussian_linear_posterior_is_the_known_one():
    """theta given x is N(x / 2, 0.05 I): least squares of theta on x finds the slope 1/2 and
    the residual variance 0.05, within what 20,000 rows resolve."""
    data = load_dataset("gaussian-linear", num_points=25_000, seed=1)
    assert data.event_shape == (10,) and data.context_dim == 10 and data.train.shape == (20_000, 10)
    theta, x = data.train.astype(np.float64), data.train_context.astype(np.float64)
    slope = (theta * x).sum(0) / (x * x).sum(0)
    np.testing.assert_allclose(slope, 0.5, atol=0.02)
    np.testing.assert_allclose((theta - slope * x).var(0), 0.05, rtol=0.05)


@pytest.mark.parametrize("name", TOYS)
def test_toy_shapes_dtypes_and_seeding(name):
    data = load_dataset(name, num_points=500, seed=3)
    assert data.name == name and data.event_shape == (2,) and data.dim == 2 and data.context_dim == 0
    assert data.train.shape == (400, 2) and data.test.shape == (100, 2)
    assert data.train.dtype == np.float32 and data.test.dtype == np.float32
    assert data.levels is None and data.train_context is None and data.test_context is None
    again = load_dataset(name, num_points=500, seed=3)
    assert np.array_equal(data.train, again.train) and np.array_equal(data.test, again.test)
    other = load_dataset(name, num_points=500, seed=4)
    assert not np.array_equal(data.train, other.train)
    assert len(load_dataset(name, seed=0).train) + len(load_dataset(name, seed=0).test) == DEFAULT_TOY_POINTS


def test_toy_geometry():
    circles = load_dataset("circles", 4000).train
    radii = np.linalg.norm(circles, axis=1)
    assert np.mean(np.abs(radii - 1.0) < 0.2) == pytest.approx(0.5, abs=0.05)
    assert np.mean(np.abs(radii - 0.5) < 0.2) == pytest.approx(0.5, abs=0.05)

    gaussians = load_dataset("8gaussians", 4000).train * math.sqrt(2.0)
    angles = np.round(np.arctan2(gaussians[:, 1], gaussians[:, 0]) / (np.pi / 4)) % 8
    counts = np.bincount(angles.astype(int), minlength=8)
    assert counts.min() > 300 and np.linalg.norm(gaussians, axis=1).mean() == pytest.approx(4.0, abs=0.2)

    board = load_dataset("checkerboard", 4000).train
    assert board.min() >= -4 and board.max() <= 4
    cells = np.floor(board / 2.0).astype(int)  # 4x4 cells of width 2
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)  # only the dark squares
    assert len({tuple(cell) for cell in cells}) == 8


def test_moons_split_matches_train_test_split():
    """``flowserve train --num-points 2000 --seed 0`` and the test fixtures see the same split."""
    data = load_dataset("moons", num_points=2000, seed=0)
    train, test = train_test_split(two_moons(2000, seed=0), seed=0)
    assert np.array_equal(data.train, train) and np.array_equal(data.test, test)


def test_tabular_set():
    data = load_dataset("breast-cancer")
    assert data.event_shape == (30,) and data.dim == 30 and data.levels is None
    assert len(data.train) + len(data.test) == 569 and len(data.test) == 114
    assert data.train.dtype == np.float32
    correlation = np.corrcoef(data.train, rowvar=False)
    assert np.abs(correlation[np.triu_indices(30, 1)]).max() > 0.95  # strongly correlated features
    subset = load_dataset("breast-cancer", num_points=100, seed=1)
    assert len(subset.train) + len(subset.test) == 100
    with pytest.raises(ValueError, match="569 rows"):
        load_dataset("breast-cancer", num_points=1000)


def test_digits_pixels():
    data = load_dataset("digits", seed=0)
    assert data.event_shape == (1, 8, 8) and data.dim == 64 and data.levels == 17
    assert data.train.shape[1:] == (1, 8, 8) and data.train.dtype == np.float32
    assert len(data.train) + len(data.test) == 1797
    pixels = np.concatenate([data.train, data.test])
    assert pixels.min() == 0 and pixels.max() == 16 and np.array_equal(pixels, np.round(pixels))
    assert data.context_dim == 0 and data.train_context is None
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(data.test, other.test)


def test_digits_conditional_one_hot():
    from sklearn.datasets import load_digits

    data = load_dataset("digits-conditional", seed=0)
    assert data.context_dim == 10 and data.levels == 17
    for rows, context in ((data.train, data.train_context), (data.test, data.test_context)):
        assert context.dtype == np.float32 and context.shape == (len(rows), 10)
        assert np.all(context.sum(axis=1) == 1) and set(np.unique(context)) == {0.0, 1.0}
    # Each image keeps its own label: look the images up in scikit-learn's copy.
    bunch = load_digits()
    label_of = {bunch.images[i].astype(np.float32).tobytes(): bunch.target[i] for i in range(len(bunch.target))}
    labels = np.array([label_of[image[0].tobytes()] for image in data.test])
    assert np.array_equal(labels, data.test_context.argmax(axis=1))
    assert np.bincount(data.train_context.argmax(axis=1), minlength=10).min() > 100


def test_dataset_validates_its_arrays():
    rows = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="float32"):
        Dataset("x", rows.astype(np.float64), rows, (2,))
    with pytest.raises(ValueError, match=r"expected float32 \[N, 3\]"):
        Dataset("x", rows, rows, (3,))
    with pytest.raises(ValueError, match="both be set"):
        Dataset("x", rows, rows, (2,), train_context=np.zeros((4, 1), np.float32))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'mnist'.*moons"):
        load_dataset("mnist")


def test_summarize_flattens_images():
    data = load_dataset("digits")
    summary = summarize(data.train)
    assert summary["n"] == len(data.train) and summary["dim"] == 64 and len(summary["std"]) == 64
    json.dumps(summary)


# ---------------------------------------------------------------------------------------
# User files.


def _array(rows=40, cols=3, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)


def test_user_npy_round_trip(tmp_path):
    array = _array()
    path = tmp_path / "sensors.npy"
    np.save(path, array)
    data = load_dataset(str(path), seed=5)
    assert data.name == "sensors" and data.event_shape == (3,) and data.levels is None
    assert data.train.shape == (32, 3) and data.test.shape == (8, 3)
    assert sorted(map(tuple, np.concatenate([data.train, data.test]))) == sorted(map(tuple, array))
    again = load_dataset(path, seed=5)
    assert np.array_equal(data.test, again.test)
    assert not np.array_equal(data.test, load_dataset(path, seed=6).test)
    np.save(path, array.astype(np.float64))
    assert load_dataset(path).train.dtype == np.float32


@pytest.mark.parametrize("header", [True, False])
def test_user_csv_round_trip(tmp_path, header):
    array = _array(rows=20, cols=4).astype(np.float64)
    path = tmp_path / "table.CSV"
    lines = (["alpha,beta, gamma ,delta"] if header else []) + [",".join(repr(float(v)) for v in row) for row in array]
    path.write_text("\n".join(lines) + "\n\n")
    assert np.array_equal(read_user_array(path), array.astype(np.float32))
    data = load_dataset(path)
    assert data.name == "table" and data.event_shape == (4,) and len(data.train) + len(data.test) == 20


def test_user_num_points_subsets(tmp_path):
    path = tmp_path / "rows.npy"
    np.save(path, _array(rows=100))
    data = load_dataset(path, num_points=50)
    assert len(data.train) + len(data.test) == 50


def test_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        load_dataset(tmp_path / "nothing.npy")

    path = tmp_path / "cube.npy"
    np.save(path, np.zeros((20, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"expected a 2-D array \[N, D\], got shape \[20, 2, 2\]"):
        load_dataset(path)
    np.save(path, np.zeros(20, np.float32))
    with pytest.raises(ValueError, match=r"got shape \[20\]"):
        load_dataset(path)

    path = tmp_path / "holes.npy"
    array = _array(rows=30)
    array[17, 2] = np.nan
    np.save(path, array)
    with pytest.raises(ValueError, match="non-finite value nan at row 17, column 2"):
        load_dataset(path)
    array[17, 2] = 0.0
    array[4, 0] = np.inf
    np.save(path, array)
    with pytest.raises(ValueError, match="non-finite value inf at row 4, column 0"):
        load_dataset(path)
    np.save(path, np.full((20, 2), 1e300))  # finite in float64, not in float32
    with pytest.raises(ValueError, match="row 0, column 0"):
        load_dataset(path)

    path = tmp_path / "few.npy"
    np.save(path, _array(rows=9))
    with pytest.raises(ValueError, match="9 rows; at least 10"):
        load_dataset(path)
    np.save(path, _array(rows=10))
    assert len(load_dataset(path).test) == 2

    path = tmp_path / "garbage.npy"
    path.write_bytes(b"this is not numpy")
    with pytest.raises(ValueError, match="cannot read as a .npy array"):
        load_dataset(path)
    path = tmp_path / "words.npy"
    np.save(path, np.array([["a", "b"]] * 20))
    with pytest.raises(ValueError, match="not real numbers"):
        load_dataset(path)


def test_user_csv_errors(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n" + "1,2\n" * 12 + "3\n")
    with pytest.raises(ValueError, match=r"not a 2-D table: row 12 \(line 14\) has 1 columns"):
        load_dataset(path)
    path.write_text("1,2\n" * 11 + "3,nan\n")
    with pytest.raises(ValueError, match="non-finite value nan at row 11, column 1"):
        load_dataset(path)
    path.write_text("1,2\n" * 11 + "3,oops\n")
    with pytest.raises(ValueError, match=r"row 11 \(line 12\), column 1: 'oops' is not a number"):
        load_dataset(path)
    path.write_text("x,y\n" + "1,2\n" * 5)
    with pytest.raises(ValueError, match="5 rows; at least 10"):
        load_dataset(path)
    path.write_text("x,y\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_dataset(path)
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read as comma-separated text"):
        load_dataset(path)


def test_other_suffix_is_not_user_data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset(str(path))
    with pytest.raises(ValueError, match=".npy or .csv"):
        read_user_array(path)
