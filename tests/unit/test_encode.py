"""Encode (x -> z) in the gateway's service layer, on the in-memory backend: its rows go in
chunks with their contexts, it is refused with the reason for a flow that cannot encode,
and ListModels says which flows can."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import fakes
from helpers.clock import run_on_virtual_clock
from helpers.fakes import InMemoryBackend, fake_answer, write_metadata

from flowserve.contract.spec import ALL_DIRECTIONS, DIRECTIONS, ENCODE, triton_model_name
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.domain import EncodeQuery
from flowserve.server.gateway.service import FlowService, GatewayLimits
from flowserve.server.protocol.errors import FailedPrecondition, InvalidArgument, ModelNotFound

ENCODER, BOUND, OLD = "encoder", "bound", "old"


@pytest.fixture
def service(tmp_path) -> FlowService:
    """An exact conditional flow with an encode model, a VAE (a lower bound) and an exact flow
    exported before Encode existed."""
    write_metadata(tmp_path, ENCODER, family="realnvp", context_shape=list(fakes.CONTEXT_SHAPE),
                   noise_dim=fakes.EVENT_DIM, models={d: triton_model_name(ENCODER, d) for d in ALL_DIRECTIONS})
    write_metadata(tmp_path, BOUND, family="vae", log_likelihood="lower_bound", noise_dim=fakes.NOISE_DIM)
    write_metadata(tmp_path, OLD, family="maf")
    versions = {triton_model_name(n, d): ["1"] for n in (ENCODER, BOUND, OLD) for d in DIRECTIONS}
    versions[triton_model_name(ENCODER, ENCODE)] = ["1"]
    backend = InMemoryBackend(fake_answer, max_batch_size=fakes.CHUNK, versions=versions)
    return FlowService(backend, ModelCatalog(tmp_path), GatewayLimits())


def test_encode_sends_rows_in_chunks_with_their_contexts_and_joins_the_answers(service):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, *fakes.EVENT_SHAPE)).astype(np.float32)
    context = rng.normal(size=(10, 3)).astype(np.float32)
    result = run_on_virtual_clock(service.encode(EncodeQuery(ENCODER, x, context)))
    assert [len(chunk) for chunk in service.backend.chunks("x")] == [4, 4, 2]
    expected = fakes.fake_encode(x.reshape(10, fakes.EVENT_DIM), context, fakes.EVENT_DIM)
    for name in ("z", "log_det", "log_prob"):
        np.testing.assert_array_equal(getattr(result, name), expected[name])
    one = run_on_virtual_clock(service.encode(EncodeQuery(ENCODER, x, context[3])))  # one context for every row
    np.testing.assert_array_equal(one.z, fakes.fake_encode(x.reshape(10, -1), np.tile(context[3], (10, 1)), 4)["z"])


@pytest.mark.parametrize("model, reason", [
    (BOUND, "model 'bound' cannot encode: its log-likelihood is a lower bound (vae): it has no exact data -> "
            "noise map"),
    (OLD, "model 'old' cannot encode: it was exported without an encode model (flowserve exports one since Encode "
          "exists): export it again"),
])
def test_a_flow_without_an_encode_model_is_a_failed_precondition_that_says_why(service, model, reason):
    x = np.zeros((2, *fakes.EVENT_SHAPE), np.float32)
    with pytest.raises(FailedPrecondition) as info:
        asyncio.run(service.encode(EncodeQuery(model, x)))
    assert str(info.value) == reason
    assert service.backend.calls == []


@pytest.mark.parametrize("x, context, error, message", [
    (np.zeros((2, 4), np.float32), np.zeros(3, np.float32), InvalidArgument, r"x.shape is \[2, 4\]; model 'encoder' "
                                                                              r"expects \[N, 1, 2, 2\]"),
    (np.zeros((2, 1, 2, 2), np.float32), None, InvalidArgument, "model 'encoder' needs context of shape"),
    (np.full((2, 1, 2, 2), np.nan, np.float32), np.zeros(3, np.float32), InvalidArgument, "non-finite"),
])
def test_bad_rows_are_invalid_arguments_that_name_the_field(service, x, context, error, message):
    with pytest.raises(error, match=message):
        asyncio.run(service.encode(EncodeQuery(ENCODER, x, context)))


def test_an_unknown_flow_is_not_found(service):
    with pytest.raises(ModelNotFound):
        asyncio.run(service.encode(EncodeQuery("nope", np.zeros((1, 4), np.float32))))


def test_list_models_names_encode_among_the_directions_of_the_flows_that_have_it(service):
    models = {m.name: m for m in asyncio.run(service.list_models())}
    assert models[ENCODER].directions == ("density", "generation", "encode") and models[ENCODER].versions == ("1",)
    assert models[BOUND].directions == models[OLD].directions == ("density", "generation")
