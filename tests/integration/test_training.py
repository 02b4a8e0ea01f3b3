"""Small trainings, seconds each: ``flowserve train`` on a user's CSV, a refused plot of
what it trained, and training that gives the same weights twice for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.flows import FLOW_CONFIGS, moons_dataset

from flowserve import cli
from flowserve.export.data import load_dataset
from flowserve.export.flows.registry import FAMILY_NAMES, build_flow
from flowserve.export.training import TrainConfig, load_checkpoint, train_flow


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
