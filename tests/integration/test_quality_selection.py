"""The quality table's test rows take no part in training or choosing: the same scaled-down
run with other test rows trains, validates and chooses exactly the same, for a flowserve
family and for every anchor, and only the test numbers move."""

from __future__ import annotations

import dataclasses

from flowserve.export import quality

CHOICES = ("train_log_likelihood", "validation_log_likelihood", "best_step", "steps_run", "parameters", "chosen")


def test_test_rows_never_reach_training_or_selection(monkeypatch):
    first = quality.run_quality(["maf"], ["moons"], steps_scale=0.02, progress=False)
    loaded = quality.load_dataset

    def other_test_rows(name, seed=0):
        dataset = loaded(name, seed=seed)
        return dataclasses.replace(dataset, test=1.5 * dataset.test[::-1] + 0.25)

    monkeypatch.setattr(quality, "load_dataset", other_test_rows)
    second = quality.run_quality(["maf"], ["moons"], steps_scale=0.02, progress=False)
    assert [row["family"] for row in first["results"]] == ["maf", *quality.ANCHORS]
    for before, after in zip(first["results"], second["results"], strict=True):
        assert before["error"] is None and after["error"] is None
        assert {key: before.get(key) for key in CHOICES} == {key: after.get(key) for key in CHOICES}, before["family"]
        assert before["test_log_likelihood"] != after["test_log_likelihood"], before["family"]
    assert first["goals"]["moons"]["best_family"] == "maf"
