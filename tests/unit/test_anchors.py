"""The quality table's anchors: the rows every model sees, the settings chosen on validation
rows, densities in the data's units, and zuko's NSF sized like flowserve's."""

from __future__ import annotations

import numpy as np
import pytest

from flowserve.export.anchors import (
    KDE_BANDWIDTHS,
    EvaluationRows,
    ZukoNSF,
    gaussian_mixture,
    kernel_density,
    zuko_nsf_width,
)
from flowserve.export.data import Dataset, load_dataset, train_test_split
from flowserve.export.quality import dequantize

# The unit lane refuses subprocesses, so scikit-learn's k-means (the mixture's start) cannot
# ask lscpu for the physical cores and says it counts the logical ones.
pytestmark = pytest.mark.filterwarnings("ignore:Could not find the number of physical cores")


def _dataset(rows: np.ndarray, levels: int | None = None) -> Dataset:
    train, test = train_test_split(rows.astype(np.float32), seed=0)
    return Dataset("rows", train, test, rows.shape[1:], levels=levels)


def test_every_model_sees_the_same_rows_and_pixels_are_dequantized_once():
    digits = load_dataset("digits")
    rows = EvaluationRows.of(digits, seed=0)
    assert rows.train.shape == (1294, 64) and rows.validation.shape == (144, 64) and rows.test.shape == (359, 64)
    np.testing.assert_array_equal(rows.test, dequantize(digits.test, 1).reshape(359, 64))  # the baseline's noise
    assert (np.floor(rows.validation) != rows.validation).all()
    again = EvaluationRows.of(digits, seed=0)
    np.testing.assert_array_equal(rows.train, again.train)
    assert not np.array_equal(rows.train, EvaluationRows.of(digits, seed=1).train)


def test_the_mixture_finds_two_clusters_and_the_kde_scores_in_the_datas_units():
    generator = np.random.default_rng(0)
    clusters = np.concatenate([generator.normal(-5, 1, (1000, 2)), generator.normal(5, 1, (1000, 2))])
    mixture = gaussian_mixture(EvaluationRows.of(_dataset(generator.permutation(clusters))))
    assert mixture["chosen"]["components"] >= 2 and mixture["test_log_probs"].shape == (400,)
    # two unit Gaussians, half the mass each: -log 2 - log(2 pi) - 1 nats per row on average
    assert mixture["test_log_likelihood"] == pytest.approx(-np.log(2) - np.log(2 * np.pi) - 1, abs=0.15)

    wide = generator.normal(0, 100, (3000, 1))  # a KDE on standardized rows, then back to these units
    kde = kernel_density(EvaluationRows.of(_dataset(wide)))
    assert KDE_BANDWIDTHS[0] < kde["chosen"]["bandwidth"] < KDE_BANDWIDTHS[-1]
    assert kde["test_log_likelihood"] == pytest.approx(-0.5 * np.log(2 * np.pi * 100**2) - 0.5, abs=0.1)


def test_zuko_nsf_gets_about_as_many_parameters_as_asked():
    moons = load_dataset("moons", 400)
    for target in (5_000, 30_000, 200_000):
        count = sum(p.numel() for p in ZukoNSF(moons, zuko_nsf_width(moons, target)).parameters())
        assert abs(count - target) <= 0.2 * target
