"""Properties every model family must have, checked on small configs of each.

To cover a new family, add its small configs to ``FLOW_CONFIGS`` (tests/helpers/flows.py).
Exact flows must invert, report log-determinants equal to autograd's Jacobian, and (in 2-D)
integrate to one; every model, the VAE included, must agree with itself between its two
directions. Exports and training are in tests/e2e/test_flow_graphs.py."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers.flows import (
    AUTOREGRESSIVE,
    FLOW_CONFIGS,
    SEQUENTIAL,
    STANDARDIZE_3D,
    assert_like_the_loop,
    contexts,
    data_points,
    parametrize_configs,
    perturbed_model,
    sequential_direction,
    sequential_output,
    set_early_exit,
    standard_normal,
)

from flowserve import cli
from flowserve.contract.spec import DENSITY, GENERATION
from flowserve.export.data import DATASETS
from flowserve.export.exporter.graphs import EmbeddingApart
from flowserve.export.flows.autoregressive import use_cached_inverse
from flowserve.export.flows.cached_inverse import CachedMADEInverse
from flowserve.export.flows.nets import MADE
from flowserve.export.flows.registry import FAMILY_NAMES, build_flow, family_class
from flowserve.export.flows.splines import spline_with_linear_tails
from flowserve.export.flows.transforms import fixed_point_inverses
from flowserve.export.training import TrainConfig, load_checkpoint, save_checkpoint, training_record

all_models = parametrize_configs(lambda config: True)
exact_flows = parametrize_configs(lambda config: config["family"] != "vae")
two_d_flows = parametrize_configs(lambda config: config["event_shape"] == [2] and config["family"] != "vae")


def test_every_family_is_covered():
    assert {config["family"] for config in FLOW_CONFIGS.values()} == set(FAMILY_NAMES)


def test_registry_names_build_their_family_and_the_cli_offers_them():
    assert all(family_class(name).family == name for name in FAMILY_NAMES)
    parser = cli.build_parser()
    assert [parser.parse_args(["train", "--family", name]).family for name in FAMILY_NAMES] == list(FAMILY_NAMES)
    assert [parser.parse_args(["train", "--dataset", name]).dataset for name in DATASETS] == list(DATASETS)


@parametrize_configs(lambda config: config["family"] != "vae" and "preprocessing" not in config)
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


@pytest.mark.parametrize("config", SEQUENTIAL.values(), ids=SEQUENTIAL.keys())
def test_early_exit_gives_the_d_step_result_bit_for_bit(config):
    model = perturbed_model(config)
    direction = sequential_direction(config)
    early = sequential_output(model, direction)
    passes = [loop.passes_run for loop in fixed_point_inverses(model)]
    d_steps = sequential_output(set_early_exit(model, False), direction)
    for got, expected in zip(early, d_steps, strict=True):
        assert torch.equal(got, expected)
    assert [loop.passes_run for loop in fixed_point_inverses(model)] == [model.noise_dim] * len(passes)
    if model.noise_dim == 64:  # MAF and IAF stopped after 15 to 17 of 64 passes here, NSF after 25 and 26
        assert max(passes) < (40 if config["family"] == "nsf" else 32)


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


@all_models
def test_checkpoint_round_trip(config, tmp_path):
    model = perturbed_model(config)
    path = tmp_path / "nested" / "flow.pt"
    metrics = {"train_log_likelihood": -1.5, "test_log_likelihood": -1.6}
    heldout = data_points(model, 3, seed=10).numpy()
    context = contexts(model, 3, seed=10)
    training = training_record(TrainConfig(steps=7), {"train_rows": 90, "validation_rows": 10, "best_step": 5,
                                                      "steps_run": 7})
    save_checkpoint(path, model, data_summary={"n": 3}, metrics=metrics, dataset="unit-test", heldout=heldout,
                    heldout_context=None if context is None else context.numpy(), training=training)

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 3 and raw["config"] == model.config() and raw["dataset"] == "unit-test"
    assert raw["heldout_sample"].shape == heldout.shape
    assert (raw["heldout_context"] is None) == (context is None)
    assert raw["training"]["best_step"] == 5 and raw["training"]["config"]["validation_fraction"] == 0.1

    loaded, checkpoint = load_checkpoint(path)
    assert not loaded.training and checkpoint.metrics == metrics and checkpoint.training == training
    x, context = data_points(model, 128, seed=11), contexts(model, 128, seed=11)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x, context), model.log_prob(x, context))

    del raw["training"]  # as flowserve wrote it before training chose by validation
    torch.save({**raw, "format_version": 2}, path)
    older, checkpoint = load_checkpoint(path)
    assert checkpoint.training == {} and checkpoint.metrics == metrics
    with torch.no_grad():
        assert torch.equal(older.log_prob(x, context), model.log_prob(x, context))


def test_load_checkpoint_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(missing)
    wrong_version = tmp_path / "future.pt"
    torch.save({"format_version": 99}, wrong_version)
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(wrong_version)


@parametrize_configs(lambda config: "context_embedding" in config)
def test_the_directions_without_the_embedding_on_embedded_contexts_compute_the_model(config):
    """What the exporter serves apart (tests/e2e/test_flow_graphs.py exports it): the embedding,
    then the model with its embedding taken out."""
    model = perturbed_model(config)
    apart = EmbeddingApart(model)
    assert (apart.context_dim, apart.embedded_dim) == (config["context_dim"], config["context_embedding"]["features"])
    x, z = data_points(model, 64, seed=8), standard_normal(64, model.noise_dim, seed=9)
    context = contexts(model, 64, seed=10)
    with torch.no_grad():
        embedded = apart.context_embedding(context)
        assert embedded.shape == (64, apart.embedded_dim)
        assert torch.equal(apart.log_prob(x, embedded), model.log_prob(x, context))
        for got, expected in zip(apart.sample_with_log_prob(z, embedded), model.sample_with_log_prob(z, context)):
            assert torch.equal(got, expected)
        assert not torch.equal(model.log_prob(x, context), model.log_prob(x, contexts(model, 64, seed=11)))
    assert not isinstance(model.context_embedding, torch.nn.Identity)  # the model keeps its own


def test_a_context_embedding_needs_a_context_and_a_plain_config():
    embedded = FLOW_CONFIGS["maf-3d-embedded"]
    with pytest.raises(ValueError, match="the model takes no context"):
        build_flow({**embedded, "context_dim": 0})
    for bad in ({"features": 0}, {"features": 2, "hidden_features": [0]}, {"features": 2, "depth": 3}, {}):
        with pytest.raises(ValueError, match="context_embedding must be"):
            build_flow({**embedded, "context_embedding": bad})


def test_train_takes_a_context_embedding_from_the_command_line():
    parser = cli.build_parser()
    assert parser.parse_args(["train", "--context-embedding", "16:64,32"]).context_embedding == {
        "features": 16, "hidden_features": [64, 32]}
    assert parser.parse_args(["train", "--context-embedding", "8"]).context_embedding == {"features": 8}
    assert parser.parse_args(["train"]).context_embedding is None


def test_a_spline_is_the_identity_at_zero_parameters_monotonic_and_linear_outside_its_bound():
    x = torch.linspace(-8.0, 8.0, 2001, dtype=torch.float64)
    identity, log_det = spline_with_linear_tails(x, torch.zeros(len(x), 3 * 6 - 1, dtype=torch.float64), False, 3.0)
    torch.testing.assert_close(identity, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_det, torch.zeros_like(x), atol=1e-12, rtol=0)
    params = 2.0 * torch.randn(1, 3 * 6 - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, log_det = spline_with_linear_tails(x, params.expand(len(x), -1), False, 3.0)
    outside = x.abs() > 3.0
    assert torch.equal(y[outside], x[outside]) and torch.equal(log_det[outside], torch.zeros_like(x[outside]))
    assert torch.all(y[1:] > y[:-1])  # strictly increasing, across the joins too
    assert (y[~outside].min(), y[~outside].max()) >= (-3.0, -3.0) and y[~outside].max() <= 3.0
    points = torch.tensor([-3.0 + 1e-12, 3.0 - 1e-12, *x[::50].tolist()], dtype=torch.float64, requires_grad=True)
    values, point_log_det = spline_with_linear_tails(points, params.expand(len(points), -1), False, 3.0)
    (slope,) = torch.autograd.grad(values.sum(), points)
    torch.testing.assert_close(slope.log(), point_log_det.detach(), atol=1e-9, rtol=0)
    torch.testing.assert_close(slope[:2], torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)  # no kink at +-3
    back, inverse_log_det = spline_with_linear_tails(y, params.expand(len(x), -1), True, 3.0)
    torch.testing.assert_close(back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(inverse_log_det, -log_det, atol=1e-9, rtol=0)


def test_the_cached_inverse_leaves_spline_loops_alone():
    """The cached inverse solves affine layers; an autoregressive NSF keeps its loop."""
    model = perturbed_model(FLOW_CONFIGS["nsf-4d-context"])
    assert use_cached_inverse(model, 64) == 0
    assert all(loop.cached is None for loop in fixed_point_inverses(model))
