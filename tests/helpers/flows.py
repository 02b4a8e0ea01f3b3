"""Flows the tests share: the two served flows' names and batch sizes, the samples a seed
must give, small configs of every family (``FLOW_CONFIGS``) with inputs that fit them, and
the measures the sequential directions are checked with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowserve.contract.spec import DENSITY, GENERATION
from flowserve.export.data import Dataset, train_test_split, two_moons
from flowserve.export.flows.registry import build_flow
from flowserve.export.flows.transforms import fixed_point_inverses

# Two flows with the same weights whose Triton models batch differently, so the gateway
# splits the same request into chunks of different sizes.
SMALL_CHUNKS = "moons-small-chunks"
LARGE_CHUNKS = "moons-large-chunks"
SMALL_BATCH = 64
MAX_ROWS_PER_REQUEST = 80_000  # not the default (100,000), so the flag is tested


def expected_samples(flow, seed: int, n: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """What the gateway must return for Sample: the flow applied to PCG64(seed) noise."""
    noise = np.random.Generator(np.random.PCG64(seed)).standard_normal((n, flow.noise_dim), dtype=np.float32)
    with torch.no_grad():
        x, log_prob = flow.sample_with_log_prob(torch.from_numpy(noise * np.float32(temperature)))
    return x.numpy(), log_prob.numpy()


def add_weight_noise(module: torch.nn.Module, scale: float = 0.1) -> None:
    """Add ``scale`` times standard normal noise (from torch's global generator) to every
    parameter, so layers that start at zero or at the identity compute something."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def set_early_exit(model: torch.nn.Module, early_exit: bool) -> torch.nn.Module:
    """``model`` with the early exit of every sequential inverse on or off (off: D steps)."""
    for loop in fixed_point_inverses(model):
        loop.early_exit = early_exit
    return model


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
    "nsf-2d": {"family": "nsf", "event_shape": [2], "num_transforms": 3, "hidden_features": [16, 16], "bins": 6,
               "tail_bound": 3.0},
    "nsf-2d-autoregressive": {"family": "nsf", "event_shape": [2], "num_transforms": 3, "hidden_features": [16, 16],
                              "bins": 6, "tail_bound": 3.0, "variant": "autoregressive"},
    "nsf-4d-context": {"family": "nsf", "event_shape": [4], "context_dim": 2,
                       "num_transforms": 2, "hidden_features": [16], "bins": 4, "variant": "autoregressive"},
    # A context embedding between the context and the networks (exported apart as <flow>-embed).
    "nice-3d-embedded": {"family": "nice", "event_shape": [3], "context_dim": 4, "num_couplings": 3,
                         "hidden_features": [16], "context_embedding": {"features": 2, "hidden_features": [8]}},
    "maf-3d-embedded": {"family": "maf", "event_shape": [3], "context_dim": 4, "num_layers": 2,
                        "hidden_features": [16], "context_embedding": {"features": 5, "hidden_features": [8, 8]}},
    "vae-2d-embedded": {"family": "vae", "event_shape": [2], "context_dim": 3, "latent_dim": 2,
                        "hidden_features": [16], "prior_couplings": 2, "importance_samples": 8,
                        "context_embedding": {"features": 2, "hidden_features": [8]}},
}


def parametrize_configs(predicate) -> pytest.MarkDecorator:
    """Parametrize ``config`` over the configs of FLOW_CONFIGS that ``predicate`` admits."""
    chosen = {name: config for name, config in FLOW_CONFIGS.items() if predicate(config)}
    return pytest.mark.parametrize("config", chosen.values(), ids=chosen.keys())


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


AUTOREGRESSIVE = {**{name: config for name, config in FLOW_CONFIGS.items() if config["family"] in ("maf", "iaf")},
                  "maf-image": {"family": "maf", "event_shape": [1, 4, 4], "preprocessing": PIXELS, "num_layers": 2,
                                "hidden_features": [32, 32]},
                  "maf-64d": {"family": "maf", "event_shape": [64], "num_layers": 5, "hidden_features": [128]},
                  "iaf-64d": {"family": "iaf", "event_shape": [64], "num_layers": 5, "hidden_features": [128]}}
SEQUENTIAL = {**AUTOREGRESSIVE,
              **{name: config for name, config in FLOW_CONFIGS.items() if config.get("variant") == "autoregressive"},
              "nsf-64d": {"family": "nsf", "event_shape": [64], "num_transforms": 2, "hidden_features": [64],
                          "variant": "autoregressive"}}
"""Every model with a sequential direction (a fixed-point loop): MAF, IAF and autoregressive NSF."""


def sequential_direction(config: dict) -> str:
    """The direction of ``config``'s model that runs its loops: IAF's density, the others' generation."""
    return DENSITY if config["family"] == "iaf" else GENERATION


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


def moons_dataset(rows: int) -> Dataset:
    train, test = train_test_split(two_moons(rows, seed=0), seed=0)
    return Dataset(name="moons", train=train, test=test, event_shape=(2,))


def sequential_output(model, direction: str, rows: int = 256, dtype=torch.float32):
    """The sequential direction of ``model`` on seeded float32 inputs (data points or
    noise), eagerly, in ``dtype``."""
    context = contexts(model, rows, seed=4)
    context = None if context is None else context.to(dtype)
    with torch.no_grad():
        if direction == GENERATION:
            return model.sample_with_log_prob(standard_normal(rows, model.noise_dim, seed=3).to(dtype), context)
        return (model.log_prob(data_points(model, rows, seed=3).to(dtype), context),)
