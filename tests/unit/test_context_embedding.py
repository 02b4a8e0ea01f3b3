"""A flow whose context embedding is a Triton model apart (``<flow>-embed``), in the gateway's
catalog, service and health, on the in-memory backend: each distinct context of a call is
embedded once, the directions get the embedded rows, a B x N call and the call that repeats
each context N times embed the same rows, and the embed model counts for readiness."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers import fakes
from helpers.clock import run_on_virtual_clock
from helpers.fakes import InMemoryBackend, fake_answer, fake_embedding, flow_metadata, write_metadata

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import (
    ALL_DIRECTIONS,
    DENSITY,
    EMBED,
    EMBEDDED_CONTEXT,
    FLOW_MODELS,
    GENERATION,
    triton_model_name,
)
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.domain import EncodeQuery, LogLikelihoodQuery, SampleQuery
from flowserve.server.gateway.health import FlowHealth
from flowserve.server.gateway.metrics import GatewayMetrics
from flowserve.server.gateway.service import FlowService, GatewayLimits

EMBEDDED, INLINE = "embedded", "inline"
WIDTH = 5  # E: neither the context's 3 values nor the event's 4
MODELS = {d: triton_model_name(EMBEDDED, d) for d in FLOW_MODELS}


@pytest.fixture
def service(tmp_path) -> FlowService:
    """A conditional flow with an embed model of E = 5, and one exported without (which
    embeds inside its directions)."""
    conditional = {"family": "realnvp", "context_shape": list(fakes.CONTEXT_SHAPE), "noise_dim": fakes.EVENT_DIM}
    write_metadata(tmp_path, EMBEDDED, models=MODELS, embedded_dim=WIDTH, **conditional)
    write_metadata(tmp_path, INLINE, **conditional)
    versions = {model: ["1"] for model in MODELS.values()}
    versions.update({triton_model_name(INLINE, d): ["1"] for d in (DENSITY, GENERATION)})
    return FlowService(InMemoryBackend(fake_answer, max_batch_size=fakes.CHUNK, versions=versions),
                       ModelCatalog(tmp_path), GatewayLimits())


def embed_calls(backend) -> list[np.ndarray]:
    return [inputs["context"] for model, _, inputs in backend.calls if model == MODELS[EMBED]]


def direction_contexts(backend, direction: str) -> np.ndarray:
    return np.concatenate([inputs[EMBEDDED_CONTEXT] for model, _, inputs in backend.calls
                           if model == MODELS[direction]])


def test_the_embed_model_maps_context_to_embedded_context_and_the_directions_take_that():
    flow = flow_metadata(EMBEDDED, models=MODELS, embedded_dim=WIDTH, context_shape=(3,), noise_dim=4)
    embed = flow.spec(EMBED)
    assert [(t.name, t.dims) for t in embed.inputs] == [("context", (3,))]
    assert [(t.name, t.dims) for t in embed.outputs] == [(EMBEDDED_CONTEXT, (WIDTH,))]
    for direction in ALL_DIRECTIONS:
        assert [(t.name, t.dims) for t in flow.spec(direction).inputs][1] == (EMBEDDED_CONTEXT, (WIDTH,))
    assert flow.context_dim == 3  # what a client sends is still the context itself
    assert FlowMetadata.from_dict(flow.to_dict()) == flow


@pytest.mark.parametrize(("fields", "message"), [
    ({"models": MODELS}, "needs a context_shape and an embedded_dim"),
    ({"models": MODELS, "embedded_dim": WIDTH}, "needs a context_shape"),
    ({"embedded_dim": WIDTH, "context_shape": (3,)}, "embedded_dim needs an embed model"),
    ({"models": MODELS, "embedded_dim": 0, "context_shape": (3,)}, "embedded_dim must be a positive integer"),
    ({"models": MODELS, "embedded_dim": "5", "context_shape": (3,)}, "embedded_dim must be a positive integer"),
])
def test_metadata_refuses_an_embed_model_without_its_width_or_context(fields, message):
    with pytest.raises(ValueError, match=message):
        flow_metadata(EMBEDDED, **fields)


def test_a_b_by_n_call_embeds_each_distinct_context_once_as_the_repeated_call_does(service):
    contexts = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    contexts = contexts[[0, 1, 0, 2]]  # four contexts, three of them distinct
    query = SampleQuery(EMBEDDED, 0, seed=4, return_log_prob=True, context=contexts, samples_per_context=5)
    grouped = asyncio.run(service.sample(query))
    (embedded,) = embed_calls(service.backend)
    assert len(embedded) == 3
    np.testing.assert_array_equal(embedded, np.unique(contexts, axis=0))
    np.testing.assert_array_equal(direction_contexts(service.backend, GENERATION),
                                  fake_embedding(np.repeat(contexts, 5, axis=0), WIDTH))
    noise = np.random.Generator(np.random.PCG64(4)).standard_normal((20, fakes.EVENT_DIM), dtype=np.float32)
    x, log_prob = fakes.fake_generation(noise, fake_embedding(np.repeat(contexts, 5, axis=0), WIDTH))
    np.testing.assert_array_equal(grouped.samples.reshape(20, -1), x)
    np.testing.assert_array_equal(grouped.log_prob, log_prob)

    service.backend.calls.clear()
    repeated = asyncio.run(service.sample(SampleQuery(EMBEDDED, 20, seed=4, return_log_prob=True,
                                                      context=np.repeat(contexts, 5, axis=0))))
    np.testing.assert_array_equal(embed_calls(service.backend)[0], embedded)  # the same rows, so the same numbers
    np.testing.assert_array_equal(repeated.samples, grouped.samples.reshape(repeated.samples.shape))
    np.testing.assert_array_equal(repeated.log_prob, grouped.log_prob)

    async def stream():
        return [chunk async for chunk in service.sample_stream(query)]

    service.backend.calls.clear()
    chunks = asyncio.run(stream())
    assert [len(c) for c in embed_calls(service.backend)] == [3]
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks]), repeated.samples)


def test_one_context_for_every_row_is_embedded_once(service):
    context = np.array([0.5, -1.0, 2.0], np.float32)
    asyncio.run(service.sample(SampleQuery(EMBEDDED, 10, seed=1, context=context)))
    assert [c.tolist() for c in embed_calls(service.backend)] == [[context.tolist()]]
    np.testing.assert_array_equal(direction_contexts(service.backend, GENERATION),
                                  np.tile(fake_embedding(context[None], WIDTH), (10, 1)))


@pytest.mark.parametrize("method", ["log_likelihood", "encode"])
def test_per_row_contexts_are_embedded_once_each_and_travel_with_their_rows(service, method):
    rng = np.random.default_rng(3)
    distinct = rng.normal(size=(6, 3)).astype(np.float32)
    context = distinct[rng.integers(0, 6, size=30)]
    x = rng.normal(size=(30, *fakes.EVENT_SHAPE)).astype(np.float32)
    if method == "log_likelihood":
        result = asyncio.run(service.log_likelihood(LogLikelihoodQuery(EMBEDDED, x, context))).log_prob
    else:
        result = asyncio.run(service.encode(EncodeQuery(EMBEDDED, x, context))).log_prob
    distinct_sent = np.concatenate(embed_calls(service.backend))
    assert [len(c) for c in embed_calls(service.backend)] == [4, 2]  # six distinct rows, in chunks of 4
    np.testing.assert_array_equal(distinct_sent, np.unique(context, axis=0))
    np.testing.assert_array_equal(result, fakes.fake_density(x.reshape(30, -1), fake_embedding(context, WIDTH)))


def test_a_flow_without_an_embed_model_gets_its_contexts_as_before(service):
    context = np.random.default_rng(5).normal(size=(2, 3)).astype(np.float32)
    asyncio.run(service.sample(SampleQuery(INLINE, 0, seed=2, context=context, samples_per_context=3)))
    assert {model for model, _, _ in service.backend.calls} == {triton_model_name(INLINE, GENERATION)}
    np.testing.assert_array_equal(np.concatenate(service.backend.chunks("context")), np.repeat(context, 3, axis=0))


def test_the_embedding_spends_the_calls_deadline(service):
    service.backend.delay = lambda index: 3.0 if index == 0 else 0.0  # the embed call takes 3 s
    context = np.zeros((2, 3), np.float32)
    run_on_virtual_clock(service.sample(SampleQuery(EMBEDDED, 0, seed=0, context=context, samples_per_context=2),
                                        timeout=10.0))
    assert service.backend.timeouts[0] == pytest.approx(10.0)
    assert service.backend.timeouts[1] == pytest.approx(7.0)


def test_list_models_counts_the_embed_model_for_readiness_but_not_as_a_direction(service):
    async def listed():
        return {info.name: info for info in await service.list_models()}

    info = asyncio.run(listed())[EMBEDDED]
    assert info.directions == ALL_DIRECTIONS and info.ready and info.versions == ("1",)
    del service.backend.versions[MODELS[EMBED]]
    info = asyncio.run(listed())[EMBEDDED]
    assert not info.ready and info.versions == ()


def test_health_probes_the_embed_model_and_reloads_it_when_it_stops_answering(service):
    health = FlowHealth(service.backend, service.catalog, GatewayMetrics())

    async def scenario():
        assert (await health.check(server_ready=True))[EMBEDDED]
        assert MODELS[EMBED] in service.backend.probes
        service.backend.broken.add(MODELS[EMBED])
        assert not (await health.check(server_ready=True))[EMBEDDED]
        await asyncio.gather(*health._reloads.values())
        assert service.backend.loads == [f"-{MODELS[EMBED]}", MODELS[EMBED]]
        assert (await health.check(server_ready=True))[EMBEDDED]

    asyncio.run(scenario())
