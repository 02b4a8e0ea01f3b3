"""Many samples for each of many contexts, live, for a conditional model of every family,
with its context embedding served apart or inside: B x N answers exactly what the call that
repeats each context N times answers, and SampleStream the same rows, on the real Triton and
gateway; a flow whose embedding is served apart gives the model's own numbers.
(tests/e2e/test_families.py does the same for the trained conditional Real NVP on digits,
and tests/e2e/test_adapters_export.py for a conditional zuko NSF and an nflows MAF with an
embedding net.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2
from helpers.flows import FLOW_CONFIGS, contexts, data_points, perturbed_model
from helpers.processes import start_serve, stop_serve, wait_for_health

from flowserve.export.exporter.parity import scaled_gap
from flowserve.export.exporter.pipeline import export_model
from flowserve.export.exporter.triton_config import ServingConfig
from flowserve.export.flows.registry import FAMILY_NAMES
from flowserve.server.client import FlowClient

CONDITIONAL = {  # NICE's embedding apart is exported in tests/e2e/test_flow_graphs.py, not served here
    **{name: config for name, config in FLOW_CONFIGS.items()
       if config.get("context_dim") and name != "nice-3d-embedded"},
    "nice-3d-context": {"family": "nice", "event_shape": [3], "context_dim": 2, "num_couplings": 3,
                        "hidden_features": [16]},
    "maf-3d-context": {"family": "maf", "event_shape": [3], "context_dim": 2, "num_layers": 2,
                       "hidden_features": [16]},
}
EMBEDDED = [name for name, config in CONDITIONAL.items() if "context_embedding" in config]
INLINE = "maf-3d-embedded-inline"  # maf-3d-embedded exported as before: the embedding inside each direction
CONTEXTS, PER_CONTEXT = 3, 50
CHUNK = 64  # Triton's max batch size here: 150 rows go as 64 + 64 + 22, across context boundaries


def test_there_is_a_conditional_model_of_every_family():
    assert {config["family"] for config in CONDITIONAL.values()} == set(FAMILY_NAMES)


@pytest.fixture(scope="module")
def conditional_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("conditional_repository")
    for name, config in CONDITIONAL.items():
        model = perturbed_model(config)
        export_model(model, repository, name=name, example_data=data_points(model, 64, seed=1).numpy(),
                     example_context=contexts(model, 64, seed=2).numpy(),
                     serving=ServingConfig(format="torchscript", max_batch_size=CHUNK, encode=False))
    model = perturbed_model(CONDITIONAL["maf-3d-embedded"])
    export_model(model, repository, name=INLINE, example_data=data_points(model, 64, seed=1).numpy(),
                 example_context=contexts(model, 64, seed=2).numpy(),
                 serving=ServingConfig(format="torchscript", max_batch_size=CHUNK, encode=False,
                                       separate_embedding=False))
    process, port, _ = start_serve(repository, tmp_path_factory.mktemp("conditional_serve"))
    target = f"127.0.0.1:{port}"
    try:
        wait_for_health(target, process, health_pb2.HealthCheckResponse.SERVING)
        with FlowClient(target, timeout=120) as client:
            yield client
    finally:
        stop_serve(process)


@pytest.mark.parametrize("name", [*CONDITIONAL, INLINE])
def test_samples_per_context_are_the_samples_of_the_repeated_contexts_bit_for_bit(conditional_server, name):
    config = CONDITIONAL[name.removesuffix("-inline")]
    context = np.random.default_rng(4).normal(size=(CONTEXTS, config["context_dim"])).astype(np.float32)
    grouped = conditional_server.sample(name, seed=9, context=context, samples_per_context=PER_CONTEXT)
    repeated = conditional_server.sample(name, CONTEXTS * PER_CONTEXT, seed=9,
                                         context=np.repeat(context, PER_CONTEXT, axis=0))
    streamed = list(conditional_server.sample_stream(name, seed=9, context=context, samples_per_context=PER_CONTEXT))
    rows = CONTEXTS * PER_CONTEXT
    assert grouped.x.shape == (CONTEXTS, PER_CONTEXT, *config["event_shape"])
    np.testing.assert_array_equal(grouped.x.reshape(rows, -1), repeated.x.reshape(rows, -1))
    np.testing.assert_array_equal(grouped.log_prob.reshape(rows), repeated.log_prob)
    np.testing.assert_array_equal(np.concatenate([chunk.x for chunk in streamed]), repeated.x)
    np.testing.assert_array_equal(np.concatenate([chunk.log_prob for chunk in streamed]), repeated.log_prob)
    assert np.concatenate([chunk.context_index for chunk in streamed]).tolist() == np.repeat(
        np.arange(CONTEXTS), PER_CONTEXT).tolist()
    assert np.isfinite(repeated.log_prob).all() and np.unique(repeated.x.reshape(rows, -1), axis=0).shape[0] == rows


def test_an_embedding_served_apart_gives_the_models_numbers(conditional_server):
    """The embed model runs once per distinct context and the directions take its rows: the
    served log-densities and samples are the model's (float64), and those of the same model
    exported with its embedding inside the directions."""
    listed = {info.name: info for info in conditional_server.list_models()}
    assert all(listed[name].ready for name in [*EMBEDDED, INLINE])
    for name in EMBEDDED:
        model = perturbed_model(CONDITIONAL[name]).double()
        x, context = data_points(model, 200, seed=5), contexts(model, 200, seed=6)
        context = context[np.arange(200) % 7]  # seven distinct contexts
        served = conditional_server.log_likelihood(name, x.float().numpy(), context.float().numpy())
        with torch.no_grad():
            expected = model.log_prob(x.float().double(), context.float().double()).numpy()
        assert scaled_gap(served, expected) <= 1e-4, name
        sample = conditional_server.sample(name, 100, seed=3, context=context[0].float().numpy())
        with torch.no_grad():
            again = model.log_prob(torch.tensor(sample.x, dtype=torch.float64),
                                   context[:1].float().double().expand(100, -1))
        assert scaled_gap(sample.log_prob, again.numpy()) <= 1e-3, name
    model = perturbed_model(CONDITIONAL["maf-3d-embedded"])
    x, context = data_points(model, 100, seed=7).numpy(), contexts(model, 100, seed=8).numpy()
    apart = conditional_server.log_likelihood("maf-3d-embedded", x, context)
    inside = conditional_server.log_likelihood(INLINE, x, context)
    assert scaled_gap(apart, inside) <= 1e-5
