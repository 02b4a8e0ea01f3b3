"""The quality table's anchors: what a flow family must beat to be worth serving.

Two classical density estimators from scikit-learn, each with its settings chosen on the
validation rows (:class:`EvaluationRows`): a Gaussian mixture (components and covariance
type) and a Gaussian kernel density estimate on standardized features (bandwidth). And
zuko's neural spline flow, trained by :func:`flowserve.export.training.train_flow` under the
same recipe as flowserve's families (steps, batch, early stopping), with about as many
parameters as flowserve's NSF. Every anchor scores the same test rows, row by row, so
differences between models have paired standard errors. Test rows take no part in
fitting or choosing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowserve.contract.metadata import EXACT

from .data import Dataset, dequantize, validation_split

GMM_COMPONENTS = (1, 2, 4, 8, 16, 32, 64, 128)
GMM_COVARIANCES = ("full", "diag")
KDE_BANDWIDTHS = tuple(float(h) for h in np.geomspace(0.02, 2.0, 21))
"""Bandwidths tried, in units of each feature's training standard deviation."""
VALIDATION_FRACTION = 0.1
"""The share of the training rows that chooses: the same split :func:`train_flow` holds back."""


@dataclass(frozen=True)
class EvaluationRows:
    """A data set's rows as every model of the quality table sees them, flattened to
    ``[N, D]`` float64: the rows models fit, the validation rows that choose, and the test
    rows. Pixel data is dequantized once, each split with its own seed, so that every model
    scores the very same test rows."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, dataset: Dataset, seed: int = 0) -> EvaluationRows:
        split = validation_split(dataset, VALIDATION_FRACTION, seed)
        parts = [split.train, split.validation, dataset.test]
        if dataset.levels is not None:  # the test rows' noise is the Gaussian baseline's (seed + 1)
            parts = [dequantize(part, seed + offset) for offset, part in zip((0, 2, 1), parts)]
        return cls(*(np.asarray(part, dtype=np.float64).reshape(len(part), -1) for part in parts))


def _chosen(candidates, fit_and_score) -> tuple[Any, Any, float]:
    """The candidate whose fit scores best on validation: ``(candidate, model, score)``."""
    best = (None, None, -math.inf)
    for candidate in candidates:
        try:
            model, score = fit_and_score(candidate)
        except (ValueError, np.linalg.LinAlgError):  # e.g. more components than rows
            continue
        if score > best[2]:
            best = (candidate, model, score)
    if best[0] is None:
        raise ValueError("no candidate could be fitted")
    return best


def _result(chosen: dict[str, Any], train: np.ndarray, validation: float, test: np.ndarray,
            started: float, parameters: int) -> dict[str, Any]:
    return {"chosen": chosen, "parameters": parameters,
            "train_log_likelihood": float(train.mean()), "validation_log_likelihood": validation,
            "test_log_likelihood": float(test.mean()), "test_log_probs": test,
            "seconds": time.perf_counter() - started}


def gaussian_mixture(rows: EvaluationRows, seed: int = 0) -> dict[str, Any]:
    """scikit-learn's ``GaussianMixture`` fitted to the training rows, with the components
    and covariance type of :data:`GMM_COMPONENTS` x :data:`GMM_COVARIANCES` that score best
    on the validation rows."""
    from sklearn.mixture import GaussianMixture

    started = time.perf_counter()

    def fit(setting):
        components, covariance = setting
        if components > len(rows.train) // 2:
            raise ValueError("too many components for the rows")
        model = GaussianMixture(components, covariance_type=covariance, reg_covar=1e-6, n_init=1,
                                random_state=seed, max_iter=500).fit(rows.train)
        return model, float(model.score_samples(rows.validation).mean())

    (components, covariance), model, score = _chosen(
        [(k, c) for c in GMM_COVARIANCES for k in GMM_COMPONENTS], fit)
    parameters = int(model._n_parameters())
    return _result({"components": components, "covariance": covariance},
                   model.score_samples(rows.train), score, model.score_samples(rows.test), started, parameters)


def kernel_density(rows: EvaluationRows) -> dict[str, Any]:
    """scikit-learn's Gaussian ``KernelDensity`` on the training rows standardized by their
    own mean and deviation, with the bandwidth of :data:`KDE_BANDWIDTHS` that scores best on
    the validation rows; densities in the data's units."""
    from sklearn.neighbors import KernelDensity

    started = time.perf_counter()
    mean, std = rows.train.mean(axis=0), np.maximum(rows.train.std(axis=0), 1e-12)
    log_scale = float(np.log(std).sum())

    def standardized(part: np.ndarray) -> np.ndarray:
        return (part - mean) / std

    def fit(bandwidth):
        model = KernelDensity(bandwidth=bandwidth).fit(standardized(rows.train))
        return model, float(model.score_samples(standardized(rows.validation)).mean()) - log_scale

    bandwidth, model, score = _chosen(KDE_BANDWIDTHS, fit)
    return _result({"bandwidth": round(bandwidth, 4)},
                   model.score_samples(standardized(rows.train)) - log_scale, score,
                   model.score_samples(standardized(rows.test)) - log_scale, started, rows.train.size)


class ZukoNSF(nn.Module):
    """zuko's NSF (autoregressive rational-quadratic splines) over a data set's flattened
    rows, standardized with its training rows' statistics, as a model ``train_flow`` trains."""

    family = "zuko-nsf"
    log_likelihood = EXACT

    def __init__(self, dataset: Dataset, hidden: int, transforms: int = 4, bins: int = 8):
        import zuko

        super().__init__()
        flat = np.asarray(dataset.train, dtype=np.float64).reshape(len(dataset.train), -1)
        mean, var = flat.mean(axis=0), flat.var(axis=0)
        if dataset.levels is not None:  # the statistics of the dequantized pixels, x + U[0, 1)
            mean, var = mean + 0.5, var + 1 / 12
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.sqrt(np.maximum(var, 1e-12)), dtype=torch.float32))
        self.flow = zuko.flows.NSF(flat.shape[1], transforms=transforms, bins=bins, hidden_features=(hidden, hidden))
        self.hidden, self.transforms, self.bins = hidden, transforms, bins

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        flat = x.reshape(len(x), -1)
        return self.flow().log_prob((flat - self.mean) / self.std) - torch.log(self.std).sum()

    def training_loss(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return -self.log_prob(x).mean()


def zuko_nsf_width(dataset: Dataset, parameters: int, transforms: int = 4, bins: int = 8) -> int:
    """The hidden width that gives :class:`ZukoNSF` the parameter count nearest ``parameters``."""
    def count(hidden: int) -> int:
        return sum(p.numel() for p in ZukoNSF(dataset, hidden, transforms, bins).parameters())

    low, high = 1, 2048
    while high - low > 1:  # the count grows with the width
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) <= parameters else (low, middle)
    return min((low, high), key=lambda hidden: abs(count(hidden) - parameters))
