"""Properties every flow family must have, checked on small configs of each.

To cover a new family, add its small configs to ``FLOW_CONFIGS``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowserve.export.data import summarize, train_test_split, two_moons
from flowserve.export.flows import FLOW_FAMILIES, Flow, build_flow
from flowserve.export.train import (
    TrainConfig,
    load_checkpoint,
    mean_log_prob,
    save_checkpoint,
    train_flow,
)

FLOW_CONFIGS: dict[str, dict] = {
    "realnvp-2d": {"family": "realnvp", "dim": 2, "num_couplings": 4, "hidden_features": [32, 32]},
    "realnvp-5d": {"family": "realnvp", "dim": 5, "num_couplings": 3, "hidden_features": [16]},
}
TWO_D_CONFIGS = {name: config for name, config in FLOW_CONFIGS.items() if config["dim"] == 2}

all_flows = pytest.mark.parametrize("config", FLOW_CONFIGS.values(), ids=FLOW_CONFIGS.keys())
two_d_flows = pytest.mark.parametrize("config", TWO_D_CONFIGS.values(), ids=TWO_D_CONFIGS.keys())


def test_every_family_is_covered():
    assert {config["family"] for config in FLOW_CONFIGS.values()} == set(FLOW_FAMILIES)


def perturbed_flow(config: dict, scale: float = 0.1, seed: int = 0) -> Flow:
    """A flow whose parameters (zero last layers included) carry seeded random noise."""
    torch.manual_seed(seed)
    flow = build_flow(config)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn_like(parameter))
    return flow.eval()


def standard_normal(rows: int, dim: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@all_flows
def test_flow_transforms_every_feature(config):
    flow = perturbed_flow(config)
    x = standard_normal(256, config["dim"])
    with torch.no_grad():
        z, ladj = flow.to_latent(x)
    assert torch.all((z - x).abs().mean(dim=0) > 0.05)
    assert ladj.abs().mean() > 0.05


@all_flows
def test_round_trips(config):
    flow = perturbed_flow(config)
    x = 2.0 * standard_normal(512, config["dim"], seed=1)
    z = standard_normal(512, config["dim"], seed=2)
    with torch.no_grad():
        x_latent, forward_ladj = flow.to_latent(x)
        x_again, inverse_ladj = flow.from_latent(x_latent)
        z_data, _ = flow.from_latent(z)
        z_again, _ = flow.to_latent(z_data)
    assert x_latent.shape == x.shape and forward_ladj.shape == (512,)
    torch.testing.assert_close(x_again, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(z_again, z, atol=1e-4, rtol=0)
    torch.testing.assert_close(inverse_ladj, -forward_ladj, atol=1e-4, rtol=0)


@all_flows
def test_log_determinants_match_autograd_jacobian(config):
    flow = perturbed_flow(config).double()
    points = 1.5 * standard_normal(6, config["dim"], seed=3, dtype=torch.float64)
    for direction in (flow.to_latent, flow.from_latent):
        _, ladj = direction(points)
        for row, point in enumerate(points):
            jacobian = torch.autograd.functional.jacobian(lambda v: direction(v[None])[0][0], point)
            sign, log_abs_det = torch.linalg.slogdet(jacobian)
            assert sign != 0
            assert abs(log_abs_det.item() - ladj[row].item()) < 1e-3


@all_flows
def test_sample_with_log_prob_agrees_with_log_prob(config):
    flow = perturbed_flow(config)
    z = standard_normal(512, config["dim"], seed=4)
    with torch.no_grad():
        x, log_prob = flow.sample_with_log_prob(z)
        x_again, log_prob_again = flow.sample_with_log_prob(z)
        torch.testing.assert_close(flow.log_prob(x), log_prob, atol=1e-4, rtol=0)
    assert torch.equal(x, x_again) and torch.equal(log_prob, log_prob_again)
    assert log_prob.shape == (512,)


@all_flows
def test_sample_follows_generator(config):
    flow = perturbed_flow(config)
    with torch.no_grad():
        first = flow.sample(64, generator=torch.Generator().manual_seed(5))
        second = flow.sample(64, generator=torch.Generator().manual_seed(5))
        other = flow.sample(64, generator=torch.Generator().manual_seed(6))
    assert first.shape == (64, config["dim"])
    assert torch.equal(first, second) and not torch.equal(first, other)


@two_d_flows
def test_density_integrates_to_one(config):
    flow = perturbed_flow(config, scale=0.2)
    cells, half_width = 400, 6.0
    edges = torch.linspace(-half_width, half_width, cells + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    grid = torch.cartesian_prod(centres, centres)
    cell_area = (2 * half_width / cells) ** 2
    with torch.no_grad():
        density = flow.double().log_prob(grid).exp()
    total = density.sum().item() * cell_area
    assert abs(total - 1.0) < 0.02
    standard_normal_peak = 1 / (2 * math.pi)
    assert abs(density.max().item() - standard_normal_peak) > 0.01  # really reshaped


@all_flows
def test_config_rebuilds_the_same_flow(config):
    flow = perturbed_flow(config)
    assert flow.config() == config
    rebuilt = build_flow(json.loads(json.dumps(flow.config())))
    rebuilt.load_state_dict(flow.state_dict(), strict=True)
    rebuilt.eval()
    x = standard_normal(128, config["dim"], seed=7)
    with torch.no_grad():
        assert torch.equal(rebuilt.log_prob(x), flow.log_prob(x))


def test_build_flow_rejects_unknown_family_and_bad_options():
    with pytest.raises(ValueError, match="unknown flow family 'glowworm'"):
        build_flow({"family": "glowworm", "dim": 2})
    with pytest.raises(ValueError, match="invalid config"):
        build_flow({**FLOW_CONFIGS["realnvp-2d"], "depth": 3})


@all_flows
def test_checkpoint_round_trip(config, tmp_path):
    flow = perturbed_flow(config)
    path = tmp_path / "nested" / "flow.pt"
    summary = {"n": 10, "dim": config["dim"], "mean": [0.0] * config["dim"], "std": [1.0] * config["dim"]}
    metrics = {"train_log_likelihood": -1.5, "test_log_likelihood": -1.6}
    save_checkpoint(path, flow, data_summary=summary, metrics=metrics, dataset="unit-test",
                    heldout=np.arange(3 * config["dim"], dtype=np.float32).reshape(3, -1))

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 1 and raw["config"] == config and raw["dataset"] == "unit-test"
    assert raw["heldout_sample"].shape == (3, config["dim"])

    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training
    assert checkpoint["metrics"] == metrics and checkpoint["data"] == summary
    x = standard_normal(128, config["dim"], seed=8)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), flow.log_prob(x))


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)
    wrong_version = tmp_path / "future.pt"
    torch.save({"format_version": 99}, wrong_version)
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(wrong_version)


def test_data_helpers_are_deterministic():
    data = two_moons(500, seed=3)
    assert data.dtype == np.float32 and data.shape == (500, 2)
    assert np.array_equal(data, two_moons(500, seed=3))
    train, test = train_test_split(data, test_fraction=0.2, seed=1)
    assert train.shape == (400, 2) and test.shape == (100, 2)
    again_train, _ = train_test_split(data, test_fraction=0.2, seed=1)
    assert np.array_equal(train, again_train)
    rows = {tuple(row) for row in np.concatenate([train, test])}
    assert rows == {tuple(row) for row in data}
    summary = summarize(data)
    assert summary["n"] == 500 and summary["dim"] == 2
    np.testing.assert_allclose(summary["mean"], data.mean(axis=0), rtol=1e-6)
    json.dumps(summary)


def diagonal_gaussian_log_likelihood(train: np.ndarray, test: np.ndarray) -> float:
    """Mean test log-likelihood of a diagonal Gaussian fitted to ``train``."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    per_feature = -0.5 * ((test - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi)
    return float(per_feature.sum(axis=1).mean())


@two_d_flows
def test_short_training_beats_gaussian_baseline(config):
    train, test = train_test_split(two_moons(2000, seed=0), seed=0)
    torch.manual_seed(0)
    flow = build_flow(config)
    before = mean_log_prob(flow, test)
    metrics = train_flow(flow, train, test, TrainConfig(steps=600), progress=False)
    baseline = diagonal_gaussian_log_likelihood(train, test)
    assert metrics["test_log_likelihood"] == pytest.approx(mean_log_prob(flow, test))
    assert metrics["test_log_likelihood"] > before + 0.5
    assert metrics["test_log_likelihood"] > baseline + 0.25


@two_d_flows
def test_training_is_deterministic(config):
    train, test = train_test_split(two_moons(400, seed=0), seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        flow = build_flow(config)
        train_flow(flow, train, test, TrainConfig(steps=20, batch_size=64), progress=False)
        runs.append(flow.state_dict())
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
