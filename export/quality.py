"""How well each flow family fits: test log-likelihoods against anchors, with standard errors.

:func:`run_quality` trains every family on a few data sets with one recipe, fits the
anchors of :mod:`flowserve.export.anchors` on the same rows, scores the same test rows and
compares (paired standard errors); :func:`write_report` writes a Markdown report
(``docs/quality.md`` by default, through ``flowserve quality``) and the same numbers as JSON
beside it.

Units: log-likelihoods are nats per example, in the data's own units. Pixel data (data
sets with ``levels``) are dequantized with uniform noise in pixel units, ``x + u`` with
``u ~ U[0, 1)``, for training (by :func:`flowserve.export.training.train_flow`) and, once
per split, for scoring every model alike. Bits per dimension are ``-log_lik / (D ln 2)``.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowserve.contract.metadata import LOWER_BOUND
from flowserve.contract.spec import bits_per_dim

from .anchors import (
    GMM_COMPONENTS,
    VALIDATION_FRACTION,
    EvaluationRows,
    ZukoNSF,
    gaussian_mixture,
    kernel_density,
    zuko_nsf_width,
)
from .data import Dataset, dequantize, load_dataset

QUALITY_DATASETS = ("moons", "8gaussians", "checkerboard", "breast-cancer", "digits")
"""Data sets ``flowserve quality`` uses by default: 2-D toys, tabular, pixels."""

BASELINE_NAME = "diagonal Gaussian (baseline)"
BASELINE_SEED = 0
"""Seed of the baseline's dequantization noise (training split; the held-out split uses +1)."""

REPORT_SCHEMA = 2
_MIN_VARIANCE = 1e-12


# ---------------------------------------------------------------------------------------
# The baseline.


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
# The recipe.


@dataclass(frozen=True)
class Recipe:
    """How every model of the quality table trains: at most ``steps`` steps of Adam, with
    early stopping on the validation rows (:class:`flowserve.export.training.TrainConfig`)."""

    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0


MAX_STEPS = 3000
SMALL_DATA_ROWS = 2000
"""Below this many training rows, batches are halved to 128."""


def recipe_for(dataset: Dataset) -> Recipe:
    """The one recipe, the same for every family and for zuko's NSF: :data:`MAX_STEPS` at
    most, batches of 256 rows (128 when fewer than :data:`SMALL_DATA_ROWS` rows train), Adam
    at 1e-3 annealed to zero, the best validation score's weights kept. Nothing in it was
    chosen by looking at test rows."""
    return Recipe(steps=MAX_STEPS, batch_size=256 if len(dataset.train) >= SMALL_DATA_ROWS else 128)


def scaled_steps(steps: int, steps_scale: float) -> int:
    """``steps * steps_scale`` rounded, at least 1."""
    return max(1, int(round(steps * steps_scale)))


# ---------------------------------------------------------------------------------------
# Running.


def per_row_log_prob(model, rows: np.ndarray, event_shape: Sequence[int], batch_size: int = 2048) -> np.ndarray:
    """``model``'s log-density of each row of ``rows`` ``[N, D]`` (reshaped to its event
    shape), float64 ``[N]``."""
    import torch

    values = torch.as_tensor(rows, dtype=torch.float32).reshape(len(rows), *event_shape)
    with torch.no_grad():
        return np.concatenate([model.log_prob(values[start:start + batch_size]).double().numpy()
                               for start in range(0, len(values), batch_size)])


def train_and_score(model, dataset: Dataset, rows: EvaluationRows, recipe: Recipe, steps_scale: float = 1.0,
                    seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Train ``model`` (a flowserve family, or an anchor flow) on ``dataset`` with
    ``recipe`` (steps scaled by ``steps_scale``), then score every row of ``rows``: one
    result row, with the test rows' log-densities under ``test_log_probs``."""
    from .training import TrainConfig, train_flow

    steps = scaled_steps(recipe.steps, steps_scale)
    config = TrainConfig(steps=steps, batch_size=recipe.batch_size, lr=recipe.lr, seed=seed,
                         weight_decay=recipe.weight_decay, validation_fraction=VALIDATION_FRACTION)
    start = time.perf_counter()
    metrics = train_flow(model, dataset, config, progress=progress)
    test = per_row_log_prob(model, rows.test, dataset.event_shape)
    return {
        "steps": steps,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "log_likelihood_kind": model.log_likelihood,
        "train_log_likelihood": float(metrics["train_log_likelihood"]),
        "validation_log_likelihood": float(per_row_log_prob(model, rows.validation, dataset.event_shape).mean()),
        "best_step": metrics["best_step"],
        "steps_run": metrics["steps_run"],
        "test_log_likelihood": float(test.mean()),
        "test_log_probs": test,
        "seconds": time.perf_counter() - start,
    }


def train_family(family: str, dataset: Dataset, rows: EvaluationRows, steps_scale: float = 1.0, seed: int = 0,
                 progress: bool = False) -> dict[str, Any]:
    """``family`` with its default config for ``dataset``, trained and scored."""
    import torch

    from .flows.registry import build_flow, default_flow_config

    torch.manual_seed(seed)  # the initial weights; train_flow seeds its own batches
    flow = build_flow(default_flow_config(family, dataset))
    return train_and_score(flow, dataset, rows, recipe_for(dataset), steps_scale, seed, progress)


def train_zuko_nsf(dataset: Dataset, rows: EvaluationRows, steps_scale: float = 1.0, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """zuko's NSF with about as many parameters as flowserve's NSF on ``dataset``, trained
    and scored with the same recipe."""
    import torch

    from .flows.registry import build_flow, default_flow_config

    target = sum(p.numel() for p in build_flow(default_flow_config("nsf", dataset)).parameters())
    torch.manual_seed(seed)
    model = ZukoNSF(dataset, zuko_nsf_width(dataset, target))
    row = train_and_score(model, dataset, rows, recipe_for(dataset), steps_scale, seed, progress)
    return {**row, "chosen": {"hidden": model.hidden, "transforms": model.transforms, "bins": model.bins,
                              "flowserve nsf parameters": target}}


def paired(row: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The mean difference of ``row``'s test log-densities to ``other``'s, row by row, and
    its standard error."""
    difference = row["test_log_probs"] - other["test_log_probs"]
    return {"to": other["family"], "difference": float(difference.mean()), "paired_se": standard_error(difference)}


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values``."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


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
    """Train every family in ``families`` on every data set in ``datasets``, fit the
    anchors (:mod:`flowserve.export.anchors`) on the same rows, and compare: the report.

    Data sets are loaded with ``seed`` (so is each flow's initialisation and batching).
    A run that raises is recorded with its ``error`` and the others go on. ``progress``
    shows a bar over the runs; ``train_progress`` a bar inside each training run too.
    ``threads`` sets torch's intra-op threads for the run (restored afterwards; None leaves
    them): one thread is the default because these small networks gain nothing from a
    second, and two threads slow down several-fold when anything else uses the CPU.
    The report holds ``datasets`` (shape, size, baseline), ``results`` (one row per run,
    flows and anchors, each with its test standard error and its paired difference to the
    best anchor), ``goals`` (per data set, the family that validated best against each
    anchor) and ``settings``; :func:`write_report` adds the command and the date.
    """
    import torch

    if steps_scale <= 0:
        raise ValueError(f"steps_scale must be positive, got {steps_scale}")
    loaded = {name: load_dataset(name, seed=seed) for name in datasets}
    entries = {name: dataset_entry(data) for name, data in loaded.items()}
    jobs = [(model, name) for name in datasets for model in (*families, *ANCHORS)]
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
    goals = {name: _compare([row for row in results if row["dataset"] == name]) for name in datasets}
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
        "goals": goals,
    }


ANCHORS = ("GaussianMixture", "KDE", "zuko NSF")
"""The anchors' names in the report, in its order."""


def _run_one(model: str, dataset: Dataset, rows: EvaluationRows, steps_scale, seed, train_progress) -> dict[str, Any]:
    if model == "GaussianMixture":
        row = gaussian_mixture(rows, seed)
    elif model == "KDE":
        row = kernel_density(rows)
    elif model == "zuko NSF":
        row = train_zuko_nsf(dataset, rows, steps_scale, seed, train_progress)
    else:
        row = train_family(model, dataset, rows, steps_scale, seed, train_progress)
    kind = "anchor" if model in ANCHORS else "family"
    test = row["test_log_probs"]
    return {"family": model, "dataset": dataset.name, "kind": kind, **row, "test_se": standard_error(test),
            "test_bits_per_dim": bits_per_dim(float(test.mean()), dataset.dim), "error": None}


def _run_jobs(jobs, loaded, entries, steps_scale, seed, progress, train_progress) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    rows = {name: EvaluationRows.of(dataset, seed) for name, dataset in loaded.items()}
    results = []
    with tqdm(jobs, desc="quality", unit="run", disable=not progress) as bar:
        for model, name in bar:
            bar.set_postfix_str(f"{model} on {name}")
            try:
                row = _run_one(model, loaded[name], rows[name], steps_scale, seed, train_progress)
            except Exception as exc:  # noqa: BLE001 - one failed run must not sink a long run
                row = {"family": model, "dataset": name, "kind": "anchor" if model in ANCHORS else "family",
                       "error": f"{type(exc).__name__}: {exc}"}
            results.append(row)
            if progress:
                bar.write(_result_line(row, entries[name]["baseline"]))
    return results


def _compare(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per data set: each run's paired difference to the anchor that validated best, and
    the family that validated best against every anchor (None without both)."""
    done = [row for row in rows if not row.get("error")]
    anchors = [row for row in done if row["kind"] == "anchor"]
    families = [row for row in done if row["kind"] == "family"]
    if not anchors or not families:
        return {"best_family": None, "best_anchor": None, "against": {}}
    best_anchor = max(anchors, key=lambda row: row["validation_log_likelihood"])
    for row in done:
        row["vs_best_anchor"] = paired(row, best_anchor)
    best = max(families, key=lambda row: row["validation_log_likelihood"])
    return {"best_family": best["family"], "best_anchor": best_anchor["family"],
            "against": {anchor["family"]: paired(best, anchor) for anchor in anchors}}


def _result_line(row: dict[str, Any], baseline: dict[str, float]) -> str:
    if row.get("error"):
        return f"{row['family']:>15} on {row['dataset']}: FAILED {row['error']}"
    return (f"{row['family']:>15} on {row['dataset']}: test log-lik {row['test_log_likelihood']:.3f} "
            f"± {row['test_se']:.3f} (baseline {baseline['test_log_likelihood']:.3f}) in {row['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------
# The report.


def _number(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–" if value is None else str(value)
    return f"{value:.{digits}f}"


def _columns(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(header, data set, key) per column: test nats per data set, and bits/dim for pixels."""
    columns = []
    for name, entry in report["datasets"].items():
        columns.append((f"{name} (nats)", name, "test_log_likelihood"))
        if entry["levels"] is not None:
            columns.append((f"{name} (bits/dim)", name, "test_bits_per_dim"))
    return columns


def _cell(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "–"
    if row.get("error"):
        return "failed"
    if key == "test_bits_per_dim":
        return _number(row[key], 3)
    return f"{_number(row[key])} ± {_number(row['test_se'])}"


def _difference(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return "–"
    return f"{comparison['difference']:+.3f} ± {comparison['paired_se']:.3f}"


def goal_met(goal: dict[str, Any]) -> bool | None:
    """Whether the family that validated best beats the Gaussian mixture and the KDE by more
    than two paired standard errors and comes within one of zuko's NSF (or beats it); None
    when an anchor is missing."""
    against = goal["against"]
    if not all(name in against for name in ANCHORS):
        return None
    beats = all(against[name]["difference"] > 2 * against[name]["paired_se"] for name in ("GaussianMixture", "KDE"))
    return beats and against["zuko NSF"]["difference"] >= -against["zuko NSF"]["paired_se"]


def format_report(report: dict[str, Any]) -> str:
    """The Markdown text of a quality report (with ``command`` and ``date`` set)."""
    columns = _columns(report)
    by_run = {(row["family"], row["dataset"]): row for row in report["results"]}
    models = list(dict.fromkeys(row["family"] for row in report["results"])) or list(report["settings"]["families"])
    bounds = {row["family"] for row in report["results"] if row.get("log_likelihood_kind") == LOWER_BOUND}
    anchors = {row["family"] for row in report["results"] if row.get("kind") == "anchor"}
    lines = [
        "# Flow quality",
        "",
        f"Generated on {report['date']} by:",
        "",
        "```sh",
        report["command"],
        "```",
        "",
        "Test mean log-likelihood per example in nats (higher is better), ± its standard error. Every "
        "family and anchor trains on the same rows, chooses on the same validation rows (a tenth of the training "
        "split, seeded) and is scored on the same test rows, which take no part in training or "
        "choosing. One recipe for every family and for zuko's NSF (`flowserve.export.quality."
        f"recipe_for`): at most {MAX_STEPS} steps of Adam at 1e-3 annealed to zero, batches of 256 rows "
        f"(128 under {SMALL_DATA_ROWS} training rows), the validation score every 50 steps, the best "
        "weights kept, and a stop after 10 scores without improvement. The anchors: scikit-learn's "
        f"GaussianMixture with its components ({GMM_COMPONENTS[0]} to {GMM_COMPONENTS[-1]}) and covariance type "
        "(full or diagonal) chosen "
        "on validation; a Gaussian KDE on standardized features with its bandwidth chosen on "
        "validation; and zuko's NSF (autoregressive, 4 transforms, 8 bins) with the hidden width that "
        "gives it flowserve's NSF's parameter count. The diagonal Gaussian, the old baseline, fits the "
        "whole training split. Pixel "
        "data (digits, values 0..16) are dequantized with uniform noise in pixel units; bits/dim = "
        "-log-lik / (D ln 2), lower is better. A family marked *lower bound* reports the VAE's "
        "importance-weighted bound, not the exact value.",
        "",
        "| model | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model in models:
        label = f"{model} (lower bound)" if model in bounds else f"{model} (anchor)" if model in anchors else model
        lines.append(f"| {label} | " + " | ".join(_cell(by_run.get((model, name)), key) for _, name, key in columns)
                     + " |")
    baseline_cells = [_number(report["datasets"][name]["baseline"][key], 3 if key == "test_bits_per_dim" else 2)
                      for _, name, key in columns]
    lines.append(f"| {BASELINE_NAME} | " + " | ".join(baseline_cells) + " |")

    lines += [
        "",
        "## The goal",
        "",
        "Per data set, the family with the best validation log-likelihood, against each anchor: the mean "
        "difference of test log-likelihoods, row by row, ± its paired standard error. The goal: more than "
        "two paired standard errors above the GaussianMixture and the KDE, and no more than one below "
        "zuko's NSF.",
        "",
        "| data set | best family on validation | " + " | ".join(f"vs {name}" for name in ANCHORS) + " | goal |",
        "|---|---|" + "---:|" * len(ANCHORS) + "---|",
    ]
    for name, goal in report.get("goals", {}).items():
        met = goal_met(goal)
        verdict = "–" if met is None else "met" if met else "not met"
        lines.append(f"| {name} | {goal['best_family'] or '–'} | "
                     + " | ".join(_difference(goal["against"].get(anchor)) for anchor in ANCHORS) + f" | {verdict} |")

    lines += [
        "",
        "## Data sets",
        "",
        "| data set | event shape | levels | train rows | test rows |",
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
        "The last columns: each run's difference to the anchor that validated best on its data set, "
        "± the paired standard error, and the seconds it took (training and scoring).",
        "",
        "| model | data set | steps (most) | kept, run | batch | parameters | chosen | train log-lik "
        "| validation log-lik | test log-lik | vs best anchor | seconds |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        if row.get("error"):
            lines.append(f"| {row['family']} | {row['dataset']} | | | | | | failed: {row['error'].replace('|', '/')} "
                         "| | | | |")
            continue
        kept = f"{row['best_step']}, {row['steps_run']}" if "best_step" in row else "–"
        chosen = ", ".join(f"{key} {value}" for key, value in row.get("chosen", {}).items()) or "–"
        vs = row.get("vs_best_anchor")
        lines.append(
            f"| {row['family']} | {row['dataset']} | {row.get('steps', '–')} | {kept} | {row.get('batch_size', '–')} | "
            f"{row['parameters']} | {chosen} | {_number(row['train_log_likelihood'])} | "
            f"{_number(row['validation_log_likelihood'])} | {_cell(row, 'test_log_likelihood')} | "
            f"{'–' if vs is None or vs['to'] == row['family'] else _difference(vs)} | {row['seconds']:.1f} |"
        )
    env = report["environment"]
    lines += [
        "",
        f"Total {report['total_seconds'] / 60:.1f} min wall clock; Python {env['python']}, torch {env['torch']} "
        f"with {env['torch_threads']} thread{'s' if env['torch_threads'] != 1 else ''} on {env['machine']}. "
        f"The same numbers are in `{report.get('json_name', 'quality.json')}`.",
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
    results = [{key: value for key, value in row.items() if key != "test_log_probs"} for row in report["results"]]
    json_report = _finite_or_null({**{key: value for key, value in report.items() if key != "json_name"},
                                   "results": results})
    json_path.write_text(json.dumps(json_report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return output, json_path


__all__ = [
    "ANCHORS", "BASELINE_NAME", "DiagonalGaussian", "MAX_STEPS", "QUALITY_DATASETS", "Recipe", "bits_per_dim",
    "dequantize", "format_report", "gaussian_baseline", "goal_met", "recipe_for", "run_quality", "scaled_steps",
    "train_and_score", "write_report",
]
