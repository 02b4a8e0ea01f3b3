"""Small trainings, seconds each: ``flowserve train`` on a user's CSV, a refused plot of
what it trained, training that gives the same weights twice for the same seed, and
training that chooses by validation rows and never sees the test rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.flows import FLOW_CONFIGS, moons_dataset

from flowserve import cli
from flowserve.export.data import Dataset, load_dataset, train_test_split, two_moons, validation_split
from flowserve.export.flows.registry import FAMILY_NAMES, build_flow
from flowserve.export.training import TrainConfig, load_checkpoint, mean_log_prob, train_flow


def _array(rows=40, cols=3, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)


def test_train_command_on_user_csv(tmp_path, capsys):
    rows = _array(rows=60, cols=3, seed=1) * np.array([1.0, 10.0, 100.0], np.float32) + 5.0
    path = tmp_path / "readings.csv"
    path.write_text("a,b,c\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n")
    checkpoint = tmp_path / "ckpt.pt"
    assert cli.main(["train", "--family", "maf", "--data", str(path), "--steps", "3", "--batch-size", "8",
                     "--seed", "2", "-o", str(checkpoint)]) == 0
    assert "trained maf on readings" in capsys.readouterr().out
    flow, saved = load_checkpoint(checkpoint)
    expected = load_dataset(path, seed=2)
    assert saved.dataset == "readings" and saved.data["n"] == len(expected.train) == 48
    assert np.array_equal(saved.heldout_sample.numpy(), expected.test)
    assert saved.heldout_context is None
    preprocessing = saved.config["preprocessing"]
    assert preprocessing["kind"] == "standardize"
    np.testing.assert_allclose(preprocessing["mean"], expected.train.mean(0), rtol=1e-5)
    assert tuple(flow.event_shape) == (3,)

    parser = cli.build_parser()
    assert parser.parse_args(["train"]).family == "realnvp"
    for family in FAMILY_NAMES:
        assert parser.parse_args(["train", "--family", family]).family == family
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["train", "--dataset", "moons", "--data", str(path)])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err

    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n" * 11 + "3,nan\n")
    assert cli.main(["train", "--data", str(bad), "--steps", "1", "-o", str(tmp_path / "x.pt")]) == 1
    assert "non-finite value nan at row 11, column 1" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_plot_rejects_tabular_flows(tmp_path, capsys):
    checkpoint = tmp_path / "maf.pt"
    assert cli.main(["train", "--family", "maf", "--dataset", "breast-cancer", "--steps", "2", "-o",
                     str(checkpoint)]) == 0
    assert cli.main(["plot", str(checkpoint), "-o", str(tmp_path / "x.png")]) == 1
    assert "cannot plot a flow with event shape [30]" in capsys.readouterr().err


def test_training_is_deterministic():
    dataset = moons_dataset(400)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_flow(FLOW_CONFIGS["glow-2d"])
        train_flow(model, dataset, TrainConfig(steps=20, batch_size=64), progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


def test_test_rows_take_no_part_in_training_or_selection():
    """Held-out rows of NaN: had one reached a batch or a validation score, training would
    stop on a non-finite loss or never find a best step."""
    dataset = moons_dataset(600)
    poisoned = Dataset(name="moons", train=dataset.train, test=np.full_like(dataset.test, np.nan), event_shape=(2,))
    torch.manual_seed(0)
    model = build_flow(FLOW_CONFIGS["realnvp-2d"])
    metrics = train_flow(model, poisoned, TrainConfig(steps=100, batch_size=64, eval_every=20), progress=False)
    assert np.isfinite(metrics["validation_log_likelihood"]) and np.isnan(metrics["test_log_likelihood"])
    assert (metrics["train_rows"], metrics["validation_rows"]) == (432, 48)  # 10% of the 480 training rows
    split = validation_split(dataset, 0.1, seed=0)
    rows = {tuple(row) for row in dataset.train.tolist()}
    assert {tuple(row) for row in split.train.tolist()} | {tuple(row) for row in split.validation.tolist()} == rows
    assert not {tuple(row) for row in split.train.tolist()} & {tuple(row) for row in split.validation.tolist()}


def test_early_stopping_keeps_the_best_weights_by_validation():
    """40 training rows and a large flow overfit: validation stops improving, training stops
    after ``patience`` scores without improvement, and the weights are those of the best
    score, which the flow then gives again on the validation rows."""
    train, test = train_test_split(two_moons(100, seed=1), seed=0)
    dataset = Dataset(name="few-moons", train=train[:40], test=test, event_shape=(2,))
    torch.manual_seed(0)
    model = build_flow({**FLOW_CONFIGS["realnvp-2d"], "hidden_features": [128, 128]})
    config = TrainConfig(steps=3000, batch_size=32, lr=3e-3, eval_every=25, patience=4, validation_fraction=0.25,
                         cosine_lr=False)
    metrics = train_flow(model, dataset, config, progress=False)
    assert metrics["steps_run"] < config.steps and metrics["steps_run"] == metrics["best_step"] + 4 * 25
    split = validation_split(dataset, 0.25, seed=0)
    assert mean_log_prob(model, split.validation) == pytest.approx(metrics["validation_log_likelihood"], abs=1e-6)
    assert metrics["train_log_likelihood"] > metrics["validation_log_likelihood"]


def test_no_validation_runs_every_step_and_keeps_the_last_weights():
    dataset = moons_dataset(400)
    torch.manual_seed(0)
    model = build_flow(FLOW_CONFIGS["maf-2d"])
    metrics = train_flow(model, dataset, TrainConfig(steps=30, batch_size=64, validation_fraction=0.0),
                         progress=False)
    assert metrics["steps_run"] == metrics["best_step"] == 30 and metrics["validation_rows"] == 0
    assert "validation_log_likelihood" not in metrics and metrics["train_rows"] == len(dataset.train)
    with pytest.raises(ValueError, match="too few to hold back"):
        validation_split(Dataset(name="tiny", train=dataset.train[:4], test=dataset.test, event_shape=(2,)), 0.1)
