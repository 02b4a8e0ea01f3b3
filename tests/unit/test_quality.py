"""The diagonal-Gaussian baseline, the quality report and the refusals of ``flowserve
quality`` and ``flowserve plot``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowserve import cli
from flowserve.export import quality
from flowserve.export.data import Dataset, load_dataset, train_test_split, two_moons
from flowserve.export.quality import (
    ANCHORS,
    BASELINE_NAME,
    DiagonalGaussian,
    bits_per_dim,
    format_report,
    gaussian_baseline,
    goal_met,
    recipe_for,
    scaled_steps,
    write_report,
)


def _gaussian_dataset(n: int, mean, std, seed: int = 0, levels=None) -> Dataset:
    rng = np.random.default_rng(seed)
    rows = (np.asarray(mean) + np.asarray(std) * rng.standard_normal((n, len(mean)))).astype(np.float32)
    train, test = train_test_split(rows, seed=seed)
    return Dataset("gauss", train, test, (len(mean),), levels=levels)


def test_bits_per_dim():
    assert bits_per_dim(-64 * math.log(2.0), 64) == pytest.approx(1.0)
    assert bits_per_dim(0.0, 3) == 0.0
    assert bits_per_dim(-10.0, 5) == pytest.approx(10 / (5 * math.log(2)))


def test_baseline_approaches_the_analytic_entropy():
    mean, std = [1.0, -3.0, 10.0], [0.5, 2.0, 0.1]
    data = _gaussian_dataset(200_000, mean, std)
    entropy = 0.5 * sum(math.log(2 * math.pi * math.e * s**2) for s in std)
    result = gaussian_baseline(data)
    assert result["test_log_likelihood"] == pytest.approx(-entropy, abs=0.02)
    assert result["train_log_likelihood"] == pytest.approx(-entropy, abs=0.02)
    assert result["test_bits_per_dim"] == pytest.approx(entropy / (3 * math.log(2)), abs=0.01)
    model = DiagonalGaussian.fit(data.train)
    np.testing.assert_allclose(model.mean, mean, atol=0.01)
    np.testing.assert_allclose(np.sqrt(model.var), std, rtol=0.01)
    assert model.entropy() == pytest.approx(entropy, abs=0.01)


def test_baseline_matches_scipy_on_moons():
    from scipy.stats import norm

    train, test = train_test_split(two_moons(2000, seed=0), seed=0)
    data = Dataset("moons", train, test, (2,))
    expected = norm.logpdf(test, train.mean(0), train.std(0)).sum(1).mean()
    assert gaussian_baseline(data)["test_log_likelihood"] == pytest.approx(expected, rel=1e-6)


def test_baseline_dequantizes_pixel_data_in_pixel_units():
    # Pixels that are always 0 become U[0, 1) after dequantization: a Gaussian with the
    # uniform's moments (variance 1/12) scores -0.5 * log(2 pi e / 12) nats per pixel.
    rows = np.zeros((20_000, 1, 2, 2), np.float32)
    data = Dataset("blank", rows[:16_000], rows[16_000:], (1, 2, 2), levels=17)
    result = gaussian_baseline(data)
    per_pixel = -0.5 * math.log(2 * math.pi * math.e / 12)
    assert result["test_log_likelihood"] == pytest.approx(4 * per_pixel, abs=0.03)
    assert result["test_bits_per_dim"] == pytest.approx(-per_pixel / math.log(2), abs=0.01)
    assert gaussian_baseline(data) == result  # fixed seed
    assert gaussian_baseline(data, seed=1) != result
    # Without dequantization, constant pixels would give an absurd density.
    continuous = Dataset("blank", data.train, data.test, (1, 2, 2))
    assert gaussian_baseline(continuous)["test_log_likelihood"] > 40


def test_baseline_on_digits_is_finite_and_plausible():
    data = load_dataset("digits")
    result = gaussian_baseline(data)
    assert math.isfinite(result["test_log_likelihood"])
    # Between a uniform over [0, 17)^64 and a sharp model.
    assert -64 * math.log(17) < result["test_log_likelihood"] < 0
    assert result["test_bits_per_dim"] == pytest.approx(bits_per_dim(result["test_log_likelihood"], 64))


def test_one_recipe_for_every_family_and_data_set():
    assert recipe_for(load_dataset("moons")) == quality.Recipe(steps=quality.MAX_STEPS, batch_size=256)
    assert recipe_for(load_dataset("breast-cancer")) == quality.Recipe(steps=quality.MAX_STEPS, batch_size=128)
    assert scaled_steps(2000, 0.01) == 20 and scaled_steps(300, 0.001) == 1 and scaled_steps(100, 1.5) == 150


def _row(family, name, kind="family", test=-1.25, error=None):
    if error:
        return {"family": family, "dataset": name, "kind": kind, "error": error}
    return {"family": family, "dataset": name, "kind": kind, "steps": 3, "batch_size": 16, "lr": 1e-3,
            "parameters": 1234, "log_likelihood_kind": "exact", "train_log_likelihood": -1.5,
            "validation_log_likelihood": -1.375, "best_step": 2, "steps_run": 3, "test_log_likelihood": test,
            "test_se": 0.125, "test_bits_per_dim": 2.0 if name == "digits" else 0.9, "seconds": 1.25, "error": None,
            "test_log_probs": np.full(4, test)}


def _report(error_family=None):
    results = []
    for name in ("moons", "digits"):
        for family in ("realnvp", "maf"):
            error = "FloatingPointError: boom" if family == error_family and name == "digits" else None
            results.append(_row(family, name, error=error))
        results.append({**_row("GaussianMixture", name, "anchor", test=-2.0), "chosen": {"components": 4}})
    return {
        "schema": 2,
        "settings": {"families": ["realnvp", "maf"], "datasets": ["moons", "digits"], "steps_scale": 1.0, "seed": 0},
        "environment": {"python": "3.11", "torch": "2.13", "torch_threads": 2, "machine": "x86_64"},
        "total_seconds": 90.0,
        "datasets": {
            "moons": {"event_shape": [2], "dim": 2, "levels": None, "context_dim": 0, "train_rows": 3200,
                      "test_rows": 800, "baseline": {"train_log_likelihood": -2.0, "test_log_likelihood": -2.125,
                                                     "test_bits_per_dim": 1.5}},
            "digits": {"event_shape": [1, 8, 8], "dim": 64, "levels": 17, "context_dim": 0, "train_rows": 1438,
                       "test_rows": 359, "baseline": {"train_log_likelihood": -150.0, "test_log_likelihood": -151.0,
                                                      "test_bits_per_dim": 3.4039}},
        },
        "results": results,
        "goals": {name: quality._compare([row for row in results if row["dataset"] == name])
                  for name in ("moons", "digits")},
    }


def test_table_format():
    report = _report(error_family="maf")
    report["results"][0]["log_likelihood_kind"] = "lower_bound"
    text = format_report({**report, "command": "flowserve quality --seed 0",
                          "date": "2030-01-02 03:04 UTC"})
    lines = text.splitlines()
    assert "flowserve quality --seed 0" in lines and "Generated on 2030-01-02 03:04 UTC by:" in lines
    header = "| model | moons (nats) | digits (nats) | digits (bits/dim) |"
    assert header in lines
    table = lines[lines.index(header):]
    assert table[1] == "|---|---:|---:|---:|"
    assert table[2] == "| realnvp (lower bound) | -1.25 ± 0.12 | -1.25 ± 0.12 | 2.000 |"
    assert table[3] == "| maf | -1.25 ± 0.12 | failed | failed |"
    assert table[4] == "| GaussianMixture (anchor) | -2.00 ± 0.12 | -2.00 ± 0.12 | 2.000 |"
    assert table[5] == f"| {BASELINE_NAME} | -2.12 | -151.00 | 3.404 |"
    assert "| moons | realnvp | +0.750 ± 0.000 | – | – | – |" in lines  # two anchors missing: no verdict
    assert "| maf | digits | | | | | | failed: FloatingPointError: boom | | | | |" in lines
    assert ("| realnvp | moons | 3 | 2, 3 | 16 | 1234 | – | -1.50 | -1.38 | -1.25 ± 0.12 | +0.750 ± 0.000 | 1.2 |"
            in lines)
    assert ("| GaussianMixture | moons | 3 | 2, 3 | 16 | 1234 | components 4 | -1.50 | -1.38 | -2.00 ± 0.12 | – "
            "| 1.2 |" in lines)
    assert "| digits | 1×8×8 | 17 | 1438 | 359 |" in lines
    # every table row has as many cells as its header
    for block_header in [line for line in lines if line.startswith(("| model", "| data set"))]:
        start = lines.index(block_header)
        width = block_header.count("|")
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            assert line.count("|") == width, line


def test_paired_differences_and_the_goal():
    flow, mixture = _row("maf", "moons"), _row("GaussianMixture", "moons", "anchor")
    flow["test_log_probs"] = np.array([1.0, 2.0, 3.0, 6.0])
    mixture["test_log_probs"] = np.array([0.0, 1.0, 1.0, 2.0])
    comparison = quality.paired(flow, mixture)
    assert comparison["to"] == "GaussianMixture" and comparison["difference"] == 2.0
    assert comparison["paired_se"] == pytest.approx(np.std([1, 1, 2, 4], ddof=1) / 2)
    assert quality.standard_error(np.array([1.0, 3.0])) == pytest.approx(1.0)

    def goal(*differences):
        return {"against": {name: {"difference": d, "paired_se": 1.0} for name, d in zip(ANCHORS, differences)}}

    assert goal_met(goal(2.5, 2.5, -1.0)) and goal_met(goal(3, 3, 5))
    assert not goal_met(goal(2.0, 2.5, 0)) and not goal_met(goal(2.5, 2.5, -1.5))
    assert goal_met({"against": {"KDE": {"difference": 9, "paired_se": 1}}}) is None


def test_write_report(tmp_path):
    report = _report()
    report["results"][0]["test_log_likelihood"] = float("-inf")
    markdown, json_path = write_report(report, tmp_path / "sub" / "quality.md", "flowserve quality", "today")
    assert markdown == tmp_path / "sub" / "quality.md" and json_path == tmp_path / "sub" / "quality.json"
    text = markdown.read_text()
    assert "| realnvp | -inf ± 0.12 |" in text and "`quality.json`" in text
    saved = json.loads(json_path.read_text())  # strict JSON: -inf became null; no per-row arrays
    assert saved["results"][0]["test_log_likelihood"] is None and "test_log_probs" not in saved["results"][0]
    assert saved["command"] == "flowserve quality" and saved["date"] == "today"
    assert saved["datasets"]["digits"]["baseline"]["test_bits_per_dim"] == 3.4039
    with pytest.raises(ValueError, match="suffix other than .json"):
        write_report(report, tmp_path / "quality.json", "x", "y")


def test_run_quality_records_a_failure_and_goes_on(monkeypatch):
    calls = []

    def fake_run(model, dataset, rows, steps_scale, seed, train_progress):
        calls.append((model, dataset.name, steps_scale, seed))
        if model == "bad":
            raise FloatingPointError("training loss became non-finite by step 3")
        return {"family": model, "dataset": dataset.name, "kind": "family", "test_log_likelihood": 0.0, "error": None}

    monkeypatch.setattr(quality, "_run_one", fake_run)
    report = quality.run_quality(["bad", "good"], ["moons"], steps_scale=0.5, seed=7, progress=False)
    assert calls == [(model, "moons", 0.5, 7) for model in ("bad", "good", *ANCHORS)]
    assert report["results"][0]["error"] == "FloatingPointError: training loss became non-finite by step 3"
    assert report["results"][1]["error"] is None
    assert report["datasets"]["moons"]["train_rows"] == 3200
    assert report["settings"] == {"families": ["bad", "good"], "datasets": ["moons"], "steps_scale": 0.5, "seed": 7}
    with pytest.raises(ValueError, match="steps_scale"):
        quality.run_quality(["good"], ["moons"], steps_scale=0)


def test_quality_command_rejects_unknown_names(tmp_path, capsys):
    assert cli.main(["quality", "--families", "realnvp,nope", "--output", str(tmp_path / "q.md")]) == 1
    assert "unknown flow family nope" in capsys.readouterr().err
    assert cli.main(["quality", "--datasets", "mnist", "--output", str(tmp_path / "q.md")]) == 1
    assert "unknown data set mnist" in capsys.readouterr().err
    assert not (tmp_path / "q.md").exists()


def test_quality_names_the_zuko_extra_it_compares_with(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "zuko" else find_spec(name, *rest))
    assert cli.main(["quality", "--output", str(tmp_path / "q.md")]) == 1
    assert "pip install 'flowserve[export,zuko]'" in capsys.readouterr().err
    assert not (tmp_path / "q.md").exists()


def test_the_published_quality_report_is_the_readmes_run_rendered_from_its_json():
    """docs/quality.md is a full ``flowserve quality`` run over every family, anchor and data
    set, rendered from docs/quality.json; a scaled-down run is trained in
    tests/e2e/test_quality_training.py."""
    from pathlib import Path

    from flowserve.export.flows.registry import FAMILY_NAMES

    docs = Path(__file__).resolve().parents[2] / "docs"
    report = json.loads((docs / "quality.json").read_text())
    assert report["command"] == "flowserve quality"
    assert report["settings"]["steps_scale"] == 1.0
    assert set(report["settings"]["families"]) == set(FAMILY_NAMES)
    assert report["settings"]["datasets"] == list(quality.QUALITY_DATASETS)
    runs = {(row["family"], row["dataset"]) for row in report["results"]}
    assert runs == {(f, d) for f in (*FAMILY_NAMES, *ANCHORS) for d in quality.QUALITY_DATASETS}
    assert (docs / "quality.md").read_text() == format_report({**report, "json_name": "quality.json"})
