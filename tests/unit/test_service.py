"""The gateway's service layer on an in-memory backend: chunking, the per-request and
gateway-wide budgets, deadlines, and clean-up after a failed chunk.

The same behaviours run live on Triton in tests/e2e/test_live_gateway.py; here each is
pinned without a server."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers.clock import run_on_virtual_clock
from helpers.fakes import InMemoryBackend

from flowserve.contract.metadata import FlowMetadata
from flowserve.contract.spec import DENSITY, DIRECTIONS, triton_model_name
from flowserve.server.gateway.catalog import ModelCatalog
from flowserve.server.gateway.domain import LogLikelihoodQuery, SampleQuery
from flowserve.server.gateway.service import FlowService, GatewayLimits
from flowserve.server.protocol.errors import BackendError, DeadlineExceeded, ResourceExhausted

FLOW = "plain"
DIM = 2


def doubling(spec, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Density: the row sum; generation: x = 2 z and log_prob the row sum of z."""
    if spec.direction == DENSITY:
        return {"log_prob": inputs["x"].sum(axis=1)}
    return {"x": 2 * inputs["z"], "log_prob": inputs["z"].sum(axis=1)}


@pytest.fixture
def flow_repository(tmp_path):
    models = {d: triton_model_name(FLOW, d) for d in DIRECTIONS}
    FlowMetadata(name=FLOW, family="maf", event_shape=(DIM,), models=models).write(tmp_path)
    return tmp_path


def make_service(repository, limits: GatewayLimits = GatewayLimits(), max_batch_size: int = 4):
    backend = InMemoryBackend(doubling, max_batch_size=max_batch_size)
    return FlowService(backend, ModelCatalog(repository), limits), backend


def test_rows_go_in_chunks_of_the_max_batch_size_and_come_back_in_order(flow_repository):
    service, backend = make_service(flow_repository)
    backend.delay = lambda index: 0.01 * (3 - index)  # later chunks finish first
    x = np.arange(20, dtype=np.float32).reshape(10, DIM)
    result = run_on_virtual_clock(service.log_likelihood(LogLikelihoodQuery(FLOW, x)))
    assert [len(chunk) for chunk in backend.chunks("x")] == [4, 4, 2]
    np.testing.assert_array_equal(result.log_prob, x.sum(axis=1))


def test_a_request_keeps_at_most_its_chunk_budget_in_flight(flow_repository):
    limits = GatewayLimits(max_chunks_in_flight_per_request=2)
    service, backend = make_service(flow_repository, limits, max_batch_size=1)
    backend.delay = 0.01
    result = run_on_virtual_clock(service.sample(SampleQuery(FLOW, 7, seed=3, return_log_prob=True)))
    assert len(backend.calls) == 7 and backend.most_running == 2
    noise = np.random.Generator(np.random.PCG64(3)).standard_normal((7, DIM), dtype=np.float32)
    np.testing.assert_array_equal(result.samples, 2 * noise)


def test_the_in_flight_budget_refuses_work_beyond_it_and_is_given_back(flow_repository):
    service, backend = make_service(flow_repository, GatewayLimits(100, 150), max_batch_size=64)

    async def scenario() -> None:
        backend.gate = asyncio.Event()
        first = asyncio.create_task(service.sample(SampleQuery(FLOW, 100, seed=1)))
        await asyncio.sleep(0.01)  # the first request now holds 100 of the 150 rows
        with pytest.raises(ResourceExhausted, match="100 rows in flight, limit 150"):
            await service.sample(SampleQuery(FLOW, 100, seed=2))
        fits = asyncio.create_task(service.sample(SampleQuery(FLOW, 50, seed=2)))
        await asyncio.sleep(0.01)
        assert not fits.done()  # admitted: it waits on the backend, not refused
        backend.gate.set()
        assert (await first).samples.shape == (100, DIM) and (await fits).samples.shape == (50, DIM)
        assert (await service.sample(SampleQuery(FLOW, 100, seed=2))).samples.shape == (100, DIM)

    run_on_virtual_clock(scenario())


def test_a_failed_chunk_cancels_the_others_and_gives_the_rows_back_once_they_stopped(flow_repository):
    service, backend = make_service(flow_repository, GatewayLimits(100, 100, max_chunks_in_flight_per_request=8),
                                    max_batch_size=10)
    backend.delay = lambda index: 0.0 if index == 0 else 10.0
    backend.failure = BackendError("Triton failed")

    async def scenario() -> None:
        with pytest.raises(BackendError, match="Triton failed"):
            await service.sample(SampleQuery(FLOW, 80, seed=0))
        assert backend.running == 0 and backend.finished == len(backend.calls) == 8
        backend.delay, backend.failure = 0.0, None
        assert (await service.sample(SampleQuery(FLOW, 100, seed=0))).samples.shape == (100, DIM)

    run_on_virtual_clock(scenario())


def test_each_chunk_gets_the_time_left_and_none_starts_after_the_deadline(flow_repository):
    limits = GatewayLimits(max_chunks_in_flight_per_request=1)
    service, backend = make_service(flow_repository, limits, max_batch_size=1)
    backend.delay = 0.4
    with pytest.raises(DeadlineExceeded, match="deadline exceeded before 'plain-generation' was called"):
        run_on_virtual_clock(service.sample(SampleQuery(FLOW, 5, seed=0), timeout=1.0))
    # 1.0, 0.6 and 0.2 s left for the first three chunks (each takes 0.4 s on the loop's clock);
    # the fourth found none and never reached the backend.
    assert backend.timeouts == pytest.approx([1.0, 0.6, 0.2], abs=1e-9)


def test_without_a_deadline_the_backend_gets_none(flow_repository):
    service, backend = make_service(flow_repository)
    run_on_virtual_clock(service.log_likelihood(LogLikelihoodQuery(FLOW, np.zeros((5, DIM), np.float32))))
    assert backend.timeouts == [None, None]


def test_a_stream_gives_the_samples_of_sample_for_the_same_seed_bit_for_bit(flow_repository):
    service, backend = make_service(flow_repository, max_batch_size=4)
    query = SampleQuery(FLOW, 10, seed=5, return_log_prob=True)

    async def scenario():
        chunks = [chunk async for chunk in service.sample_stream(query)]
        return chunks, await service.sample(query)

    chunks, whole = run_on_virtual_clock(scenario())
    assert [len(chunk.samples) for chunk in chunks] == [4, 4, 2] and {chunk.seed for chunk in chunks} == {5}
    np.testing.assert_array_equal(np.concatenate([chunk.samples for chunk in chunks]), whole.samples)
    np.testing.assert_array_equal(np.concatenate([chunk.log_prob for chunk in chunks]), whole.log_prob)
    noise = np.random.Generator(np.random.PCG64(5)).standard_normal((10, DIM), dtype=np.float32)
    np.testing.assert_array_equal(whole.samples, 2 * noise)


def test_a_stream_holds_a_few_chunks_of_the_budget_and_gives_them_back_when_the_reader_leaves(flow_repository):
    limits = GatewayLimits(100, 100, max_chunks_in_flight_per_request=2)
    service, backend = make_service(flow_repository, limits, max_batch_size=4)

    async def scenario():
        stream = service.sample_stream(SampleQuery(FLOW, 10**6, seed=0))
        first = await anext(stream)
        held = service._rows_in_flight
        await stream.aclose()  # the reader leaves after one chunk
        return first, held

    first, held = run_on_virtual_clock(scenario())
    assert len(first.samples) == 4 and held == 8  # two chunks of four rows, not 10^6
    assert service._rows_in_flight == 0 and backend.running == 0
    assert len(backend.calls) <= 3  # chunks are drawn as the reader takes them
