"""How well each flow family fits: held-out log-likelihoods next to a diagonal-Gaussian baseline.

:func:`run_quality` trains every family on a few data sets with per-family recipes and
scores the held-out split; :func:`write_report` writes a Markdown table (``docs/quality.md``
by default, through ``flowserve quality``) and the same numbers as JSON beside it.

Units: log-likelihoods are nats per example, in the data's own units. Pixel data (data
sets with ``levels``) are dequantized with uniform noise in pixel units, ``x + u`` with
``u ~ U[0, 1)``, for the flows (by :func:`flowserve.export.training.train_flow`) and for the
baseline alike, so the numbers compare. Bits per dimension are ``-log_lik / (D ln 2)``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowserve.contract.metadata import LOWER_BOUND
from flowserve.contract.spec import bits_per_dim

from .data import Dataset, load_dataset

QUALITY_DATASETS = ("moons", "breast-cancer", "digits")
"""Data sets ``flowserve quality`` uses by default: 2-D toy, tabular, pixels."""

BASELINE_NAME = "diagonal Gaussian (baseline)"
BASELINE_SEED = 0
"""Seed of the baseline's dequantization noise (training split; the held-out split uses +1)."""

REPORT_SCHEMA = 1
_MIN_VARIANCE = 1e-12


# ---------------------------------------------------------------------------------------
# The baseline.


def dequantize(rows: np.ndarray, seed: int) -> np.ndarray:
    """``rows + u`` with ``u ~ U[0, 1)`` drawn with ``seed``, float64, same shape."""
    rng = np.random.default_rng(seed)
    return np.asarray(rows, dtype=np.float64) + rng.random(np.shape(rows))


@dataclass(frozen=True)
class DiagonalGaussian:
    """A Gaussian with independent features: per-feature ``mean`` and ``var`` (flattened)."""

    mean: np.ndarray
    var: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray) -> DiagonalGaussian:
        """Maximum-likelihood fit: per-feature mean and (biased) variance of ``rows``.

        Variances are floored at 1e-12 so a constant feature keeps a finite density.
        """
        flat = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        return cls(mean=flat.mean(axis=0), var=np.maximum(flat.var(axis=0), _MIN_VARIANCE))

    def log_prob(self, rows: np.ndarray) -> np.ndarray:
        """Log-density of each row (any event shape, flattened), float64 ``[N]``."""
        flat = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
        per_feature = -0.5 * ((flat - self.mean) ** 2 / self.var + np.log(2.0 * math.pi * self.var))
        return per_feature.sum(axis=1)

    def entropy(self) -> float:
        """Differential entropy in nats: ``0.5 * sum(log(2 pi e var))``."""
        return float(0.5 * np.sum(np.log(2.0 * math.pi * math.e * self.var)))


def gaussian_baseline(dataset: Dataset, seed: int = BASELINE_SEED) -> dict[str, float]:
    """Fit a :class:`DiagonalGaussian` to the training split and score both splits.

    For pixel data (``dataset.levels`` set) both splits are dequantized first with a fixed
    seed (``seed`` for training, ``seed + 1`` for held-out rows), in pixel units. Returns
    mean log-likelihoods in nats per example and held-out bits per dimension. The context
    of conditional data sets is ignored.
    """
    train, test = dataset.train, dataset.test
    if dataset.levels is not None:
        train, test = dequantize(train, seed), dequantize(test, seed + 1)
    model = DiagonalGaussian.fit(train)
    test_log_likelihood = float(model.log_prob(test).mean())
    return {
        "train_log_likelihood": float(model.log_prob(train).mean()),
        "test_log_likelihood": test_log_likelihood,
        "test_bits_per_dim": bits_per_dim(test_log_likelihood, dataset.dim),
    }


# ---------------------------------------------------------------------------------------
# Recipes.


@dataclass(frozen=True)
class Recipe:
    """How to train one family on one kind of data for the quality table.

    ``options`` override entries of ``default_flow_config(family, dataset)``.
    """

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


def data_kind(dataset: Dataset) -> str:
    """``"image"`` for pixel data, ``"2d"`` for 2-D points, else ``"tabular"``."""
    if dataset.levels is not None or len(dataset.event_shape) > 1:
        return "image"
    return "2d" if dataset.dim == 2 else "tabular"


# Steps per (family, kind of data), measured with ``flowserve quality`` on the 2-core
# development machine (one torch thread): the whole default run (3 data sets x 6
# families) took 9 to 10 minutes on 2 cores; docs/quality.md lists each run's time. On the
# 455-row tabular set the coupling flows overfit quickly (Real NVP held out: 42 nats
# after 800 steps, 31 after 2000), so they stop early. IAF needs one network pass per
# dimension to evaluate a density, which makes each training step 30-60x dearer on
# 30-D and 64-D data: it gets few steps there. Real NVP's convolutional multi-scale
# network is the slowest per step on digits.
_BATCH_SIZES = {"2d": 256, "tabular": 128, "image": 128}
_STEPS = {  # family: steps on 2d, tabular, image data
    "nice": (2000, 2000, 2000),
    "realnvp": (2000, 800, 1500),
    "glow": (2000, 800, 1500),
    "maf": (2000, 2000, 2000),
    "iaf": (2000, 500, 300),
    "vae": (2000, 2000, 2000),
    "nsf": (2000, 2000, 2000),
}
RECIPES: dict[str, dict[str, Recipe]] = {
    family: {kind: Recipe(steps=count, batch_size=_BATCH_SIZES[kind]) for kind, count in zip(_BATCH_SIZES, steps)}
    for family, steps in _STEPS.items()
}
DEFAULT_RECIPE = Recipe(steps=1000, batch_size=256, lr=1e-3)
"""For a family without an entry in :data:`RECIPES` (e.g. one added later)."""


def recipe_for(family: str, dataset: Dataset) -> Recipe:
    """The recipe of ``family`` for the kind of ``dataset`` (:data:`DEFAULT_RECIPE` if none)."""
    return RECIPES.get(family, {}).get(data_kind(dataset), DEFAULT_RECIPE)


def scaled_steps(steps: int, steps_scale: float) -> int:
    """``steps * steps_scale`` rounded, at least 1."""
    return max(1, int(round(steps * steps_scale)))


# ---------------------------------------------------------------------------------------
# Running.


def train_and_score(
    family: str, dataset: Dataset, recipe: Recipe, steps_scale: float = 1.0, seed: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Build ``family`` with its default config for ``dataset``, train it with ``recipe``
    (steps scaled by ``steps_scale``) and return one result row (log-likelihoods, time)."""
    import torch

    from .flows.registry import build_flow, default_flow_config
    from .training import TrainConfig, train_flow

    config = default_flow_config(family, dataset)
    config.update(recipe.options)
    steps = scaled_steps(recipe.steps, steps_scale)
    torch.manual_seed(seed)  # the initial weights; train_flow seeds its own batches
    flow = build_flow(config)
    train_config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                               weight_decay=recipe.weight_decay)
    start = time.perf_counter()
    metrics = train_flow(flow, dataset, train_config, progress=progress)
    seconds = time.perf_counter() - start
    test_log_likelihood = float(metrics["test_log_likelihood"])
    return {
        "family": family,
        "dataset": dataset.name,
        "steps": steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "parameters": int(sum(p.numel() for p in flow.parameters())),
        "log_likelihood_kind": flow.log_likelihood,
        "train_log_likelihood": float(metrics["train_log_likelihood"]),
        "validation_log_likelihood": float(metrics["validation_log_likelihood"]),
        "best_step": metrics["best_step"],
        "steps_run": metrics["steps_run"],
        "test_log_likelihood": test_log_likelihood,
        "test_bits_per_dim": bits_per_dim(test_log_likelihood, dataset.dim),
        "seconds": seconds,
        "error": None,
    }


def dataset_entry(dataset: Dataset, seed: int = BASELINE_SEED) -> dict[str, Any]:
    """The report's description of ``dataset`` with its baseline."""
    return {
        "event_shape": list(dataset.event_shape),
        "dim": dataset.dim,
        "levels": dataset.levels,
        "context_dim": dataset.context_dim,
        "train_rows": len(dataset.train),
        "test_rows": len(dataset.test),
        "baseline": gaussian_baseline(dataset, seed),
    }


def run_quality(
    families: Sequence[str],
    datasets: Sequence[str] = QUALITY_DATASETS,
    steps_scale: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    train_progress: bool = False,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train every family in ``families`` on every data set in ``datasets``; the report.

    Data sets are loaded with ``seed`` (so is each flow's initialisation and batching).
    A run that raises is recorded with its ``error`` and the others go on. ``progress``
    shows a bar over the runs; ``train_progress`` a bar inside each training run too.
    ``threads`` sets torch's intra-op threads for the run (restored afterwards; None leaves
    them): one thread is the default because these small networks gain nothing from a
    second, and two threads slow down several-fold when anything else uses the CPU.
    The report holds ``datasets`` (shape, size, baseline), ``results`` (one row per run)
    and ``settings``; :func:`write_report` adds the command and the date.
    """
    import torch

    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be positive, got {steps_scale}")
    loaded = {name: load_dataset(name, seed=seed) for name in datasets}
    entries = {name: dataset_entry(data) for name, data in loaded.items()}
    jobs = [(family, name) for name in datasets for family in families]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        results = _run_jobs(jobs, loaded, entries, steps_scale, seed, progress, train_progress)
    finally:
        torch.set_num_threads(previous_threads)
    total_seconds = time.perf_counter() - started
    return {
        "schema": REPORT_SCHEMA,
        "settings": {
            "families": list(families),
            "datasets": list(datasets),
            "steps_scale": steps_scale,
            "seed": seed,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": used_threads,
            "machine": platform.machine(),
        },
        "total_seconds": total_seconds,
        "datasets": entries,
        "results": results,
    }


def _run_jobs(jobs, loaded, entries, steps_scale, seed, progress, train_progress) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    results = []
    with tqdm(jobs, desc="quality", unit="run", disable=not progress) as bar:
        for family, name in bar:
            bar.set_postfix_str(f"{family} on {name}")
            dataset = loaded[name]
            recipe = recipe_for(family, dataset)
            try:
                row = train_and_score(family, dataset, recipe, steps_scale, seed, progress=train_progress)
            except Exception as exc:  # noqa: BLE001 - one failed family must not sink a long run
                row = {"family": family, "dataset": name, "steps": scaled_steps(recipe.steps, steps_scale),
                       "error": f"{type(exc).__name__}: {exc}"}
            results.append(row)
            if progress:
                bar.write(_result_line(row, entries[name]["baseline"]))
    return results


def _result_line(row: dict[str, Any], baseline: dict[str, float]) -> str:
    if row.get("error"):
        return f"{row['family']:>8} on {row['dataset']}: FAILED {row['error']}"
    return (f"{row['family']:>8} on {row['dataset']}: held-out log-lik {row['test_log_likelihood']:.3f} "
            f"(baseline {baseline['test_log_likelihood']:.3f}) in {row['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------
# The report.


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–" if value is None else str(value)
    return f"{value:.{digits}f}"


def _columns(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(header, data set, key) per column: held-out nats per data set, and bits/dim for pixels."""
    columns = []
    for name, entry in report["datasets"].items():
        columns.append((f"{name} (nats)", name, "test_log_likelihood"))
        if entry["levels"] is not None:
            columns.append((f"{name} (bits/dim)", name, "test_bits_per_dim"))
    return columns


def format_report(report: dict[str, Any]) -> str:
    """The Markdown text of a quality report (with ``command`` and ``date`` set)."""
    columns = _columns(report)
    by_run = {(row["family"], row["dataset"]): row for row in report["results"]}
    families = list(dict.fromkeys(row["family"] for row in report["results"])) or list(
        report["settings"]["families"])

    lines = [
        "# Flow quality",
        "",
        f"Generated on {report['date']} by:",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        "Held-out mean log-likelihood per example, in nats (higher is better), after training each "
        "family with its recipe in `flowserve.export.quality.RECIPES`. The baseline is a "
        "Gaussian with independent features fitted to the training split. Pixel data (digits, "
        "values 0..16) are dequantized with uniform noise in pixel units for the flows and the "
        "baseline alike; bits/dim = -log-lik / (D ln 2), lower is better. A family marked *lower "
        "bound* reports a bound on its log-likelihood (the VAE's importance-weighted bound), not the "
        "exact value. Training holds back a tenth of the training rows, scores them every 50 steps, "
        "keeps the weights of the best score and stops after 10 scores without improvement, so a "
        "recipe's step count is a most; the held-out rows take no part in training or in choosing "
        "the weights. The recipes' step counts were chosen by hand earlier, with held-out numbers in "
        "view, so the flows' numbers may still be somewhat optimistic.",
        "",
        "| family | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    bounds = {row["family"] for row in report["results"] if row.get("log_likelihood_kind") == LOWER_BOUND}
    for family in families:
        cells = []
        for _, name, key in columns:
            row = by_run.get((family, name))
            if row is None:
                cells.append("–")
            elif row.get("error"):
                cells.append("failed")
            else:
                cells.append(_number(row[key], 3 if key == "test_bits_per_dim" else 2))
        label = f"{family} (lower bound)" if family in bounds else family
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    baseline_cells = [
        _number(report["datasets"][name]["baseline"][key], 3 if key == "test_bits_per_dim" else 2)
        for _, name, key in columns
    ]
    lines.append(f"| {BASELINE_NAME} | " + " | ".join(baseline_cells) + " |")

    lines += [
        "",
        "## Data sets",
        "",
        "| data set | event shape | levels | train rows | held-out rows |",
        "|---|---|---:|---:|---:|",
    ]
    for name, entry in report["datasets"].items():
        shape = "×".join(str(size) for size in entry["event_shape"])
        lines.append(f"| {name} | {shape} | {entry['levels'] or '–'} | {entry['train_rows']} | "
                     f"{entry['test_rows']} |")

    lines += [
        "",
        "## Runs",
        "",
        "| family | data set | steps (most) | kept, run | batch | lr | parameters | train log-lik "
        "| validation log-lik | held-out log-lik | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if row.get("error"):
            lines.append(f"| {row['family']} | {row['dataset']} | {row['steps']} | | | | | "
                         f"failed: {row['error'].replace('|', '/')} | | | |")
            continue
        kept = f"{row['best_step']}, {row['steps_run']}" if "best_step" in row else "–"
        validation = _number(row["validation_log_likelihood"]) if "validation_log_likelihood" in row else "–"
        lines.append(
            f"| {row['family']} | {row['dataset']} | {row['steps']} | {kept} | {row['batch_size']} | {row['lr']:g} | "
            f"{row['parameters']} | {_number(row['train_log_likelihood'])} | {validation} | "
            f"{_number(row['test_log_likelihood'])} | {row['seconds']:.1f} |"
        )
    env = report["environment"]
    lines += [
        "",
        f"Total {report['total_seconds'] / 60:.1f} min wall clock; Python {env['python']}, torch {env['torch']} "
        f"with {env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''} on {env['machine']}; "
        f"seconds are per run, training and held-out evaluation. The same numbers are in "
        f"`{report.get('json_name', 'quality.json')}`.",
        "",
    ]
    return "\n".join(lines)


def _finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def write_report(report: dict[str, Any], output: str | Path, command: str, date: str) -> tuple[Path, Path]:
    """Write ``report`` as Markdown to ``output`` and as JSON beside it (``.json`` suffix).

    ``command`` and ``date`` are recorded in both. Returns both paths.
    """
    output = Path(output)
    json_path = output.with_suffix(".json")
    if json_path == output:
        raise ValueError(f"{output}: the Markdown report needs a suffix other than .json")
    report = {**report, "command": command, "date": date, "json_name": json_path.name}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(format_report(report), encoding="utf-8")
    json_report = _finite_or_null({key: value for key, value in report.items() if key != "json_name"})
    json_path.write_text(json.dumps(json_report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return output, json_path


__all__ = [
    "BASELINE_NAME", "DEFAULT_RECIPE", "DiagonalGaussian", "QUALITY_DATASETS", "RECIPES", "Recipe",
    "bits_per_dim", "data_kind", "dequantize", "format_report", "gaussian_baseline", "recipe_for",
    "run_quality", "scaled_steps", "train_and_score", "write_report",
]
