"""A scaled-down ``flowserve quality`` run, in which every family beats the baseline, and
``flowserve plot`` draws what it trained."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from flowserve import cli
from flowserve.export import quality
from flowserve.export.data import load_dataset
from flowserve.export.quality import (
    ANCHORS,
    BASELINE_NAME,
    bits_per_dim,
    gaussian_baseline,
    scaled_steps,
)

# ---------------------------------------------------------------------------------------
# The commands, end to end, with few steps.


def test_a_scaled_down_quality_run_writes_the_report_of_every_family_and_anchor(tmp_path, capsys):
    """``flowserve quality`` with a tenth of the steps on moons and breast-cancer: every family
    and anchor runs on the same rows, beats the diagonal Gaussian, and the report's numbers
    hold together (standard errors, paired differences, the goal per data set)."""
    from flowserve.export.flows.registry import FAMILY_NAMES

    output = tmp_path / "docs" / "quality.md"
    argv = ["quality", "--datasets", "moons,breast-cancer", "--steps-scale", "0.1", "--output", str(output)]
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "docs" / "quality.json").read_text())
    names, models = ["moons", "breast-cancer"], [*FAMILY_NAMES, *ANCHORS]
    assert report["settings"] == {"families": list(FAMILY_NAMES), "datasets": names, "steps_scale": 0.1, "seed": 0}
    assert [(row["family"], row["dataset"]) for row in report["results"]] == [
        (model, name) for name in names for model in models]
    behind = []
    for row in report["results"]:
        assert row["error"] is None, row
        data = load_dataset(row["dataset"])
        if row["kind"] == "family" or row["family"] == "zuko NSF":
            assert row["steps"] == scaled_steps(quality.recipe_for(data).steps, 0.1) == 300
        assert 0 < row["test_se"] < 5 and row["test_bits_per_dim"] == pytest.approx(
            bits_per_dim(row["test_log_likelihood"], data.dim))
        best_anchor = report["goals"][row["dataset"]]["best_anchor"]
        anchor_mean = next(r["test_log_likelihood"] for r in report["results"]
                           if (r["family"], r["dataset"]) == (best_anchor, row["dataset"]))
        assert row["vs_best_anchor"]["difference"] == pytest.approx(row["test_log_likelihood"] - anchor_mean)
        baseline = report["datasets"][row["dataset"]]["baseline"]
        if not row["test_log_likelihood"] > baseline["test_log_likelihood"]:
            behind.append((row["family"], row["dataset"], row["test_log_likelihood"], baseline["test_log_likelihood"]))
    assert behind == []
    for name in names:
        assert report["datasets"][name]["baseline"] == gaussian_baseline(load_dataset(name, seed=0))
        assert set(report["goals"][name]["against"]) == set(ANCHORS)
    command = f"flowserve quality {' '.join(argv[1:])}"
    assert report["command"] == command
    text = output.read_text()
    assert command in text and datetime.now(timezone.utc).strftime("%Y-%m-%d") in text
    for model in [*FAMILY_NAMES, BASELINE_NAME]:
        assert f"\n| {model} | " in text or f"\n| {model} (lower bound) | " in text


@pytest.mark.parametrize("dataset, family, expect_rows", [
    ("moons", "realnvp", 1),
    ("digits", "glow", 8),
    ("digits-conditional", "realnvp", 10),
])
def test_plot_command(tmp_path, dataset, family, expect_rows):
    import matplotlib.image

    checkpoint = tmp_path / f"{family}-{dataset}.pt"
    assert cli.main(["train", "--family", family, "--dataset", dataset, "--steps", "2", "--batch-size", "16",
                     "-o", str(checkpoint)]) == 0
    output = tmp_path / "plots" / "flow.png"
    assert cli.main(["plot", str(checkpoint), "-o", str(output)]) == 0
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(output)
    height, width = image.shape[:2]
    assert np.ptp(image[..., :3]) > 0.2  # something was drawn
    if dataset == "moons":
        assert width > 1.5 * height  # scatter beside heat map
    else:
        assert height / width == pytest.approx(expect_rows / (8 if dataset == "digits" else 10), rel=0.2)
    assert cli.main(["plot", str(checkpoint)]) == 0
    assert checkpoint.with_suffix(".png").is_file()
