"""Properties every model family must have, checked on small configs of each.

To cover a new family, add its small configs to ``FLOW_CONFIGS``. Exact flows must
invert, report log-determinants equal to autograd's Jacobian, and (in 2-D) integrate to
one; every model, the VAE included, must agree with itself between its two directions
and with its exported ONNX and TorchScript graphs.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import add_weight_noise, set_early_exit

from flowserve import cli
from flowserve.contract.spec import DENSITY, GENERATION, triton_model_name
from flowserve.export.data import DATASETS, Dataset, train_test_split, two_moons
from flowserve.export.exporter.formats import EXPORTERS, export_onnx, graph_stats, load_exported
from flowserve.export.exporter.graphs import GRAPHS
from flowserve.export.exporter.parity import check_parity, parity_inputs
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.flows.autoregressive import use_cached_inverse
from flowserve.export.flows.base import Flow
from flowserve.export.flows.cached_inverse import CachedMADEInverse
from flowserve.export.flows.nets import MADE
from flowserve.export.flows.registry import FAMILY_NAMES, build_flow, family_class
from flowserve.export.flows.transforms import fixed_point_inverses
from flowserve.export.quality import gaussian_baseline
from flowserve.export.training import TrainConfig, load_checkpoint, mean_log_prob, save_checkpoint, train_flow

STANDARDIZE_3D = {"kind": "standardize", "mean": [1.0, -2.0, 0.5], "std": [2.0, 0.5, 1.0]}
PIXELS = {"kind": "dequantize", "levels": 17}
FLOW_CONFIGS: dict[str, dict] = {
    "nice-2d": {"family": "nice", "event_shape": [2], "num_couplings": 4, "hidden_features": [16, 16]},
    "realnvp-2d": {"family": "realnvp", "event_shape": [2], "num_couplings": 4, "hidden_features": [32, 32]},
    "realnvp-5d-context": {"family": "realnvp", "event_shape": [5], "context_dim": 3, "num_couplings": 3,
                           "hidden_features": [16]},
    "realnvp-image": {"family": "realnvp", "event_shape": [1, 4, 4], "preprocessing": PIXELS,
                      "num_scales": 2, "hidden_channels": 8},
    "glow-2d": {"family": "glow", "event_shape": [2], "steps_per_level": 3, "hidden_features": [16, 16]},
    "glow-image-context": {"family": "glow", "event_shape": [1, 4, 4], "context_dim": 2, "preprocessing": PIXELS,
                           "num_levels": 2, "steps_per_level": 2, "hidden_channels": 8},
    "maf-2d": {"family": "maf", "event_shape": [2], "num_layers": 3, "hidden_features": [16, 16]},
    "maf-3d-standardized": {"family": "maf", "event_shape": [3], "preprocessing": STANDARDIZE_3D,
                            "num_layers": 2, "hidden_features": [16]},
    "iaf-2d": {"family": "iaf", "event_shape": [2], "num_layers": 3, "hidden_features": [16, 16]},
    "iaf-4d-context": {"family": "iaf", "event_shape": [4], "context_dim": 2, "num_layers": 2,
                       "hidden_features": [16]},
    "vae-2d": {"family": "vae", "event_shape": [2], "latent_dim": 2, "hidden_features": [16],
               "prior_couplings": 2, "importance_samples": 16},
    "vae-image-context": {"family": "vae", "event_shape": [1, 4, 4], "context_dim": 2, "preprocessing": PIXELS,
                          "latent_dim": 3, "hidden_features": [16], "prior_couplings": 2, "importance_samples": 8},
}


def _select(predicate) -> pytest.MarkDecorator:
    chosen = {name: config for name, config in FLOW_CONFIGS.items() if predicate(config)}
    return pytest.mark.parametrize("config", chosen.values(), ids=chosen.keys())


all_models = _select(lambda config: True)
exact_flows = _select(lambda config: config["family"] != "vae")
two_d_flows = _select(lambda config: config["event_shape"] == [2] and config["family"] != "vae")


def test_every_family_is_covered():
    assert {config["family"] for config in FLOW_CONFIGS.values()} == set(FAMILY_NAMES)


def test_registry_names_build_their_family_and_the_cli_offers_them():
    assert all(family_class(name).family == name for name in FAMILY_NAMES)
    parser = cli.build_parser()
    assert [parser.parse_args(["train", "--family", name]).family for name in FAMILY_NAMES] == list(FAMILY_NAMES)
    assert [parser.parse_args(["train", "--dataset", name]).dataset for name in DATASETS] == list(DATASETS)


def perturbed_model(config: dict, scale: float = 0.1, seed: int = 0):
    """A model whose parameters (zero last layers included) carry seeded random noise."""
    torch.manual_seed(seed)
    model = build_flow(config)
    add_weight_noise(model, scale)
    return model.eval()


def standard_normal(rows: int, dim: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def data_points(model, rows: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Points where the model is defined: inside the pixel range for pixel models, else
    spread around the data's scale."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows, *model.event_shape)
    preprocessing = model.preprocessing_config
    if preprocessing["kind"] == "dequantize":
        return preprocessing["levels"] * torch.rand(shape, generator=generator, dtype=dtype)
    points = 1.5 * torch.randn(shape, generator=generator, dtype=dtype)
    if preprocessing["kind"] == "standardize":
        points = points * torch.tensor(preprocessing["std"], dtype=dtype) + torch.tensor(preprocessing["mean"], dtype=dtype)
    return points


def contexts(model, rows: int, seed: int, dtype=torch.float32) -> torch.Tensor | None:
    if not model.context_dim:
        return None
    return torch.randn(rows, model.context_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@_select(lambda config: config["family"] != "vae" and "preprocessing" not in config)
def test_flow_transforms_every_feature(config):
    flow = perturbed_model(config)
    x = data_points(flow, 256, seed=0)
    with torch.no_grad():
        z, _ = flow.to_latent(x, contexts(flow, 256, seed=0))
    assert z.shape == (256, flow.dim)
    assert torch.all((z - x.flatten(1)).abs().mean(dim=0) > 0.05)


@exact_flows
def test_round_trips(config):
    flow = perturbed_model(config)
    x = data_points(flow, 512, seed=1)
    z = standard_normal(512, flow.dim, seed=2)
    context = contexts(flow, 512, seed=3)
    with torch.no_grad():
        x_latent, forward_ladj = flow.to_latent(x, context)
        x_again, inverse_ladj = flow.from_latent(x_latent, context)
        z_data, _ = flow.from_latent(z, context)
        z_again, _ = flow.to_latent(z_data, context)
    assert x_latent.shape == (512, flow.dim) and forward_ladj.shape == (512,)
    torch.testing.assert_close(x_again, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(z_again, z, atol=1e-4, rtol=0)
    torch.testing.assert_close(inverse_ladj, -forward_ladj, atol=1e-4, rtol=1e-6)


@exact_flows
def test_log_determinants_match_autograd_jacobian(config):
    flow = perturbed_model(config).double()
    points = data_points(flow, 4, seed=3, dtype=torch.float64)
    context = contexts(flow, 4, seed=4, dtype=torch.float64)
    latents = standard_normal(4, flow.dim, seed=5, dtype=torch.float64)
    cases = [(flow.to_latent, points), (flow.from_latent, latents)]
    for direction, inputs in cases:
        _, ladj = direction(inputs, context)
        for row, point in enumerate(inputs):
            row_context = None if context is None else context[row:row + 1]
            jacobian = torch.autograd.functional.jacobian(
                lambda v: direction(v[None], row_context)[0].flatten(), point
            ).reshape(flow.dim, flow.dim)
            sign, log_abs_det = torch.linalg.slogdet(jacobian)
            assert sign != 0
            assert abs(log_abs_det.item() - ladj[row].item()) < 1e-3


@all_models
def test_sample_with_log_prob_agrees_with_log_prob(config):
    model = perturbed_model(config)
    z = standard_normal(512, model.noise_dim, seed=4)
    context = contexts(model, 512, seed=5)
    with torch.no_grad():
        x, log_prob = model.sample_with_log_prob(z, context)
        x_again, log_prob_again = model.sample_with_log_prob(z, context)
        torch.testing.assert_close(model.log_prob(x, context), log_prob, atol=1e-4, rtol=1e-6)
    assert x.shape == (512, *model.event_shape) and log_prob.shape == (512,)
    assert torch.equal(x, x_again) and torch.equal(log_prob, log_prob_again)
    assert torch.isfinite(log_prob).all()


@all_models
def test_sample_follows_generator_and_temperature(config):
    model = perturbed_model(config)
    context = contexts(model, 64, seed=6)
    with torch.no_grad():
        first = model.sample(64, context, generator=torch.Generator().manual_seed(5))
        second = model.sample(64, context, generator=torch.Generator().manual_seed(5))
        other = model.sample(64, context, generator=torch.Generator().manual_seed(6))
        cold = model.sample(64, context, generator=torch.Generator().manual_seed(5), temperature=0.1)
    assert first.shape == (64, *model.event_shape)
    assert torch.equal(first, second) and not torch.equal(first, other)
    assert cold.std(0).mean() < first.std(0).mean()


HALF_WIDTH = 6.0


def _grid_mass(model) -> tuple[float, torch.Tensor]:
    """Riemann sum of the density over the square [-HALF_WIDTH, HALF_WIDTH]^2, and the
    density's difference from N(0, I) on the grid."""
    cells = 400
    edges = torch.linspace(-HALF_WIDTH, HALF_WIDTH, cells + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    grid = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        density = model.double().log_prob(grid).exp()
    standard_normal_density = torch.exp(-0.5 * (grid**2).sum(1)) / (2 * math.pi)
    return density.sum().item() * (2 * HALF_WIDTH / cells) ** 2, density - standard_normal_density


def _fraction_inside(model, rows: int = 20_000) -> float:
    with torch.no_grad():
        samples = model.sample(rows, generator=torch.Generator().manual_seed(12))
    return (samples.abs() <= HALF_WIDTH).all(dim=1).double().mean().item()


@two_d_flows
def test_density_integrates_to_one(config):
    """The density's mass on the square equals the share of samples that land in it,
    and nearly all of them do: together, it integrates to 1."""
    model = perturbed_model(config, scale=0.15)
    inside = _fraction_inside(model)
    total, change = _grid_mass(model)
    assert inside > 0.9
    assert abs(total - inside) < 0.02
    assert change.abs().max() > 0.005  # the flow really reshaped the base density


def test_vae_bound_integrates_to_at_most_one():
    model = perturbed_model(FLOW_CONFIGS["vae-2d"], scale=0.2)
    inside = _fraction_inside(model)
    total, _ = _grid_mass(model)
    assert 0.3 < total <= inside + 0.02


@all_models
def test_config_rebuilds_the_same_model(config):
    model = perturbed_model(config)
    assert {key: value for key, value in model.config().items() if key in config} == config
    rebuilt = build_flow(json.loads(json.dumps(model.config())))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x, context = data_points(model, 128, seed=7), contexts(model, 128, seed=7)
    with torch.no_grad():
        assert torch.equal(rebuilt.log_prob(x, context), model.log_prob(x, context))


def test_build_flow_rejects_unknown_family_and_bad_options():
    with pytest.raises(ValueError, match="unknown flow family 'glowworm'"):
        build_flow({"family": "glowworm", "event_shape": [2]})
    with pytest.raises(ValueError, match="invalid config"):
        build_flow({**FLOW_CONFIGS["realnvp-2d"], "depth": 3})
    with pytest.raises(ValueError, match="lacks event_shape"):
        build_flow({"family": "maf"})
    with pytest.raises(ValueError, match="std > 0"):
        build_flow({**FLOW_CONFIGS["maf-3d-standardized"],
                    "preprocessing": {**STANDARDIZE_3D, "std": [1.0, 0.0, 1.0]}})


@pytest.mark.e2e
@all_models
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_graphs_match_pytorch(config, fmt, caplog):
    model = perturbed_model(config)
    heldout = data_points(model, 64, seed=8)
    graphs = {direction: EXPORTERS[fmt](model, direction) for direction in (DENSITY, GENERATION)}
    report = check_parity(model, graphs, fmt, parity_inputs(model, heldout, contexts(model, 64, seed=9), rows=64))
    assert max(report.values()) <= 1e-4
    assert "float64" not in caplog.text  # checked against a float64 reference
    assert ("round_trip_x" in report) == isinstance(model, Flow)


def sequential_output(model, direction: str, rows: int = 256, dtype=torch.float32):
    """The sequential direction of ``model`` on seeded float32 inputs (data points or
    noise), eagerly, in ``dtype``."""
    context = contexts(model, rows, seed=4)
    context = None if context is None else context.to(dtype)
    with torch.no_grad():
        if direction == GENERATION:
            return model.sample_with_log_prob(standard_normal(rows, model.noise_dim, seed=3).to(dtype), context)
        return (model.log_prob(data_points(model, rows, seed=3).to(dtype), context),)


AUTOREGRESSIVE = {**{name: config for name, config in FLOW_CONFIGS.items() if config["family"] in ("maf", "iaf")},
                  "maf-image": {"family": "maf", "event_shape": [1, 4, 4], "preprocessing": PIXELS, "num_layers": 2,
                                "hidden_features": [32, 32]},
                  "maf-64d": {"family": "maf", "event_shape": [64], "num_layers": 5, "hidden_features": [128]},
                  "iaf-64d": {"family": "iaf", "event_shape": [64], "num_layers": 5, "hidden_features": [128]}}


def scaled_gap(got, expected) -> float:
    """The largest ``|got - expected| / max(1, |expected|)``: float32 rounding of values of
    any size."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float((np.abs(got - expected) / np.maximum(1.0, np.abs(expected))).max())


def assert_like_the_loop(got, loop, exact):
    """``got`` is within 1e-6 of the D-step ``loop``'s result; where float32 rounding piles up
    (five D=64 layers) and the loop itself is further than that from ``exact`` (float64),
    ``got`` is about as close to ``exact`` as the loop (the two then differ by up to both
    errors)."""
    loop_error = scaled_gap(loop, exact)
    assert scaled_gap(got, exact) <= max(1e-6, 1.5 * loop_error)
    assert scaled_gap(got, loop) <= max(1e-6, 2.5 * loop_error)


@pytest.mark.parametrize("config", AUTOREGRESSIVE.values(), ids=AUTOREGRESSIVE.keys())
def test_early_exit_gives_the_d_step_result_bit_for_bit(config):
    model = perturbed_model(config)
    direction = GENERATION if config["family"] == "maf" else DENSITY
    early = sequential_output(model, direction)
    passes = [loop.passes_run for loop in fixed_point_inverses(model)]
    d_steps = sequential_output(set_early_exit(model, False), direction)
    for got, expected in zip(early, d_steps, strict=True):
        assert torch.equal(got, expected)
    assert [loop.passes_run for loop in fixed_point_inverses(model)] == [model.noise_dim] * len(passes)
    if model.noise_dim == 64:
        assert max(passes) < 32  # 15 to 17 of 64 here


@pytest.mark.e2e
@pytest.mark.parametrize("family, direction", [("maf", GENERATION), ("iaf", DENSITY)])
def test_sequential_direction_is_a_loop_not_unrolled(family, direction):
    """D=64: the early-exit loop stays one Loop per layer, and its exported graphs compute
    what the D-step loop's graphs compute."""
    model = perturbed_model(AUTOREGRESSIVE[f"{family}-64d"])
    points = (standard_normal(256, 64, seed=3) if direction == GENERATION else data_points(model, 256, seed=3)).numpy()
    for fmt, node_budget in (("onnx", 300), ("torchscript", None)):
        early = EXPORTERS[fmt](model, direction)
        d_steps = EXPORTERS[fmt](set_early_exit(copy.deepcopy(model), False), direction)
        stats = graph_stats(fmt, early)
        assert stats["loops"] == 5 and (node_budget is None or stats["nodes"] < node_budget)
        for got, expected in zip(load_exported(fmt, early)(points), load_exported(fmt, d_steps)(points), strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    one_pass = graph_stats("onnx", export_onnx(model, DENSITY if direction == GENERATION else GENERATION))
    assert one_pass["loops"] == 0


@pytest.mark.parametrize("config", AUTOREGRESSIVE.values(), ids=AUTOREGRESSIVE.keys())
def test_cached_inverse_gives_the_d_step_result(config):
    model = perturbed_model(config)
    direction = GENERATION if config["family"] == "maf" else DENSITY
    reference = set_early_exit(copy.deepcopy(model), False)
    d_steps = sequential_output(reference, direction)
    exact = sequential_output(copy.deepcopy(reference).double(), direction, dtype=torch.float64)
    assert use_cached_inverse(model, min_batch=256) == len(fixed_point_inverses(model)) > 0
    cached = sequential_output(model, direction, rows=256)
    assert not any(hasattr(loop, "passes_run") for loop in fixed_point_inverses(model))  # no loop ran
    for got, loop, truth in zip(cached, d_steps, exact, strict=True):
        assert_like_the_loop(got, loop, truth)
    fewer = sequential_output(model, direction, rows=255)  # below min_batch: the early-exit loop
    assert all(hasattr(loop, "passes_run") for loop in fixed_point_inverses(model))
    for got, expected in zip(fewer, sequential_output(reference, direction, rows=255), strict=True):
        assert torch.equal(got, expected)


def test_cached_inverse_refuses_a_made_that_is_not_autoregressive():
    made = MADE(3, [8])
    made.rest[-1].mask.fill_(1.0)  # every output sees every feature
    with pytest.raises(ValueError, match="not autoregressive"):
        CachedMADEInverse(made, 3.0)


@pytest.mark.e2e
def test_exported_cached_inverse_gives_the_d_step_result(tmp_path):
    """A conditional IAF exported with the cached inverse from 100 rows (by export_model,
    which checks parity): the slow direction's ONNX graph computes what the D-step graph
    computes, below and above 100 rows; each layer is an If over two Loops."""
    model = perturbed_model(AUTOREGRESSIVE["iaf-4d-context"])
    points, context = data_points(model, 300, seed=3), contexts(model, 300, seed=8)
    export_model(model, tmp_path, name="flow", example_data=points[:64].numpy(), example_context=context[:64].numpy(),
                 serving=ServingConfig(cached_inverse_min_batch=100))
    graph = (tmp_path / triton_model_name("flow", DENSITY) / "1" / "model.onnx").read_bytes()
    layers = len(fixed_point_inverses(model))
    stats = graph_stats("onnx", graph)
    assert stats["loops"] == 2 * layers and stats["nodes"] < 400 * layers
    reference = set_early_exit(copy.deepcopy(model), False)
    d_steps = load_exported("onnx", export_onnx(reference, DENSITY))
    cached = load_exported("onnx", graph)
    exact = GRAPHS[DENSITY](reference.double())
    for rows in (8, 300):
        with torch.no_grad():
            truth = exact(points[:rows].double(), context[:rows].double())
        inputs = (points[:rows].numpy(), context[:rows].numpy())
        assert_like_the_loop(cached(*inputs)[0], d_steps(*inputs)[0], truth)


@all_models
def test_checkpoint_round_trip(config, tmp_path):
    model = perturbed_model(config)
    path = tmp_path / "nested" / "flow.pt"
    metrics = {"train_log_likelihood": -1.5, "test_log_likelihood": -1.6}
    heldout = data_points(model, 3, seed=10).numpy()
    context = contexts(model, 3, seed=10)
    save_checkpoint(path, model, data_summary={"n": 3}, metrics=metrics, dataset="unit-test", heldout=heldout,
                    heldout_context=None if context is None else context.numpy())

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 2 and raw["config"] == model.config() and raw["dataset"] == "unit-test"
    assert raw["heldout_sample"].shape == heldout.shape
    assert (raw["heldout_context"] is None) == (context is None)

    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training and checkpoint.metrics == metrics
    x, context = data_points(model, 128, seed=11), contexts(model, 128, seed=11)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x, context), model.log_prob(x, context))


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)
    wrong_version = tmp_path / "future.pt"
    torch.save({"format_version": 99}, wrong_version)
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(wrong_version)


def moons_dataset(rows: int) -> Dataset:
    train, test = train_test_split(two_moons(rows, seed=0), seed=0)
    return Dataset(name="moons", train=train, test=test, event_shape=(2,))


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["realnvp-2d", "maf-2d"])
def test_short_training_beats_gaussian_baseline(name):
    dataset = moons_dataset(2000)
    torch.manual_seed(0)
    model = build_flow(FLOW_CONFIGS[name])
    before = mean_log_prob(model, dataset.test)
    metrics = train_flow(model, dataset, TrainConfig(steps=600), progress=False)
    assert metrics["test_log_likelihood"] == pytest.approx(mean_log_prob(model, dataset.test))
    assert metrics["test_log_likelihood"] > before + 0.5
    assert metrics["test_log_likelihood"] > gaussian_baseline(dataset)["test_log_likelihood"] + 0.25


def test_training_is_deterministic():
    dataset = moons_dataset(400)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_flow(FLOW_CONFIGS["glow-2d"])
        train_flow(model, dataset, TrainConfig(steps=20, batch_size=64), progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
