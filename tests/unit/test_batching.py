"""The gateway's batcher on an in-memory backend: concurrent calls of a model merge into
one backend call, each gets its own rows back, and failures, cancellations and deadlines
stay with the calls they belong to. Back-pressure: the queue's bounds, with waits and
retry hints computed on an injected clock."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from helpers.clock import run_on_virtual_clock
from helpers.fakes import SPEC, InMemoryBackend, batcher, row_sums, rows

from flowserve.server.gateway.backend import QueuePolicy
from flowserve.server.gateway.batching import EXPIRED_IN_QUEUE, BatchingBackend
from flowserve.server.protocol.errors import BackendError, DeadlineExceeded, ResourceExhausted


async def calls(batching: BatchingBackend, sizes: list[int], timeout: float | None = None):
    """One call per size, all started at once; their results (or errors) in order."""
    starts = np.cumsum([0, *sizes[:-1]])
    return await asyncio.gather(*(batching.infer("m", SPEC, rows(int(start), size), timeout)
                                  for start, size in zip(starts, sizes)), return_exceptions=True)


def test_calls_waiting_behind_a_batch_leave_together_and_get_their_own_rows():
    backend, batching = batcher()
    results = run_on_virtual_clock(calls(batching, [1, 2, 3, 1, 2]))
    # The first call leaves at once; the four that came in meanwhile fit in one batch of 8 rows.
    assert [len(chunk) for chunk in backend.chunks("x")] == [1, 8]
    expected = rows(0, 9)["x"].sum(axis=1)
    np.testing.assert_array_equal(np.concatenate([r["log_prob"] for r in results]), expected)
    assert [len(r["log_prob"]) for r in results] == [1, 2, 3, 1, 2]


def test_batches_stay_within_the_max_batch_size_and_the_batches_in_flight():
    backend, batching = batcher(max_batch_size=4, in_flight=2)
    results = run_on_virtual_clock(calls(batching, [3, 3, 2, 2, 1, 4]))
    assert [len(chunk) for chunk in backend.chunks("x")] == [3, 3, 4, 1, 4]
    assert backend.most_running == 2
    np.testing.assert_array_equal(np.concatenate([r["log_prob"] for r in results]), rows(0, 15)["x"].sum(axis=1))


def test_a_model_without_dynamic_batching_gets_every_call_on_its_own():
    backend, batching = batcher()
    backend.batching = False
    run_on_virtual_clock(calls(batching, [1, 2, 3]))
    assert [len(chunk) for chunk in backend.chunks("x")] == [1, 2, 3]


def test_a_failed_batch_fails_its_calls_only():
    def fails_on_negative_rows(spec, inputs):
        if (inputs["x"] < 0).any():
            raise BackendError("Triton failed")
        return row_sums(spec, inputs)

    backend, batching = batcher(fails_on_negative_rows)

    async def scenario():
        first = asyncio.ensure_future(batching.infer("m", SPEC, rows(0, 1), None))
        await asyncio.sleep(0)
        # Both wait behind the first call and leave in one batch, which fails on the negative rows.
        failed = await asyncio.gather(batching.infer("m", SPEC, rows(1, 2), None),
                                      batching.infer("m", SPEC, {"x": -rows(3, 1)["x"]}, None),
                                      return_exceptions=True)
        return await first, failed, await batching.infer("m", SPEC, rows(5, 1), None)

    first, failed, after = run_on_virtual_clock(scenario())
    assert [len(chunk) for chunk in backend.chunks("x")] == [1, 3, 1]
    assert first["log_prob"].tolist() == [1.0] and after["log_prob"].tolist() == [21.0]
    assert [type(error) for error in failed] == [BackendError, BackendError]


def test_a_cancelled_waiting_call_leaves_its_batch():
    backend, batching = batcher(delay=0.02)

    async def scenario():
        first = asyncio.ensure_future(batching.infer("m", SPEC, rows(0, 1), None))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batching.infer("m", SPEC, rows(1, 3), None))
        kept = asyncio.ensure_future(batching.infer("m", SPEC, rows(4, 2), None))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept, gone.cancelled()

    first, kept, cancelled = run_on_virtual_clock(scenario())
    assert cancelled and [len(chunk) for chunk in backend.chunks("x")] == [1, 2]
    np.testing.assert_array_equal(kept["log_prob"], rows(4, 2)["x"].sum(axis=1))


def test_a_call_whose_deadline_passes_in_a_longer_batch_gets_deadline_exceeded():
    backend, batching = batcher(delay=0.2)

    async def scenario():
        slow = asyncio.ensure_future(batching.infer("m", SPEC, rows(0, 1), None))
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded, match="deadline exceeded while 'm'"):
            await batching.infer("m", SPEC, rows(1, 1), 0.05)
        return await slow

    assert run_on_virtual_clock(scenario())["log_prob"].tolist() == [1.0]
    assert backend.timeouts == [None]  # the short call never reached the backend: it waited behind the slow one


def test_calls_beyond_the_models_queue_are_refused_at_once_with_a_retry_hint():
    backend, batching = batcher(max_batch_size=4, delay=0.05)
    backend.queue = QueuePolicy(max_size=2)  # two full batches, 8 rows, may wait

    async def scenario():
        await batching.infer("m", SPEC, rows(0, 1), None)  # a batch's time: 50 ms
        running = asyncio.ensure_future(batching.infer("m", SPEC, rows(0, 4), None))
        await asyncio.sleep(0)  # on the backend: the next calls wait
        waiting = [asyncio.ensure_future(batching.infer("m", SPEC, rows(4 + 3 * i, 3), None)) for i in range(2)]
        gone = asyncio.ensure_future(batching.infer("m", SPEC, rows(10, 2), None))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="8 rows wait for it, its queue's limit is 8; retry in about 150 ms") as refused:
            await batching.infer("m", SPEC, rows(12, 3), None)
        gone.cancel()  # its rows leave the queue: 3 rows fit again
        await asyncio.sleep(0)
        admitted = asyncio.ensure_future(batching.infer("m", SPEC, rows(12, 2), None))
        await asyncio.sleep(0)
        return refused.value, await asyncio.gather(running, *waiting, admitted)

    refused, results = run_on_virtual_clock(scenario())
    assert [len(r["log_prob"]) for r in results] == [4, 3, 3, 2]
    assert [len(chunk) for chunk in backend.chunks("x")] == [1, 4, 3, 3, 2]
    # A batch takes 50 ms, and the refused call would wait for the one running and two queued.
    assert refused.retry_after_s == pytest.approx(0.15, abs=1e-9)

    backend, batching = batcher(max_batch_size=4, delay=0.05)
    backend.queue = QueuePolicy(max_size=2)
    results = run_on_virtual_clock(calls(batching, [4, 4, 4, 4, 4]))  # the queue's room after the first batch: 8 rows
    assert len(backend.calls) == 3 and [type(r) for r in results[3:]] == [ResourceExhausted] * 2


def test_calls_that_would_wait_beyond_the_queue_timeout_are_refused():
    backend, batching = batcher(max_batch_size=4, delay=0.05)
    backend.queue = QueuePolicy(timeout_s=0.12)

    async def scenario():
        await batching.infer("m", SPEC, rows(0, 1), None)  # a batch's time: 50 ms
        # Batches start 0, 50, 100 and 150 ms from now: the fourth would wait too long.
        return await calls(batching, [4, 4, 4, 4])

    results = run_on_virtual_clock(scenario())
    assert [len(r["log_prob"]) for r in results[:3]] == [4, 4, 4]
    assert isinstance(results[3], ResourceExhausted)
    assert "would wait about 150 ms" in str(results[3]) and "its queue's timeout is 120 ms" in str(results[3])


def test_the_wait_is_estimated_at_the_pace_the_queue_drained():
    # A batch takes 20 ms on the backend, and then its caller works 30 ms on the event loop (as the
    # gateway encodes an answer: the clock moves 30 ms without the loop turning) before the next
    # batch can leave: the queue drains one per 50 ms.
    backend, batching = batcher(max_batch_size=4, delay=0.02)
    backend.queue = QueuePolicy(timeout_s=0.12)

    async def busy_call(start: int):
        result = await batching.infer("m", SPEC, rows(start, 4), None)
        asyncio.get_running_loop().advance(0.03)
        return result

    async def scenario():
        await asyncio.gather(*(busy_call(4 * i) for i in range(3)))  # a backlog drains: its pace is kept
        admitted = [asyncio.ensure_future(busy_call(4 * i)) for i in range(3)]
        await asyncio.sleep(0)  # one on the backend, two waiting
        # At the pace a fourth would wait 150 ms; at the batches' own 20 ms it would seem to wait 60.
        with pytest.raises(ResourceExhausted, match="would wait about 150 ms for it, its queue's timeout is 120 ms"):
            await batching.infer("m", SPEC, rows(12, 4), None)
        return await asyncio.gather(*admitted)

    assert [len(result["log_prob"]) for result in run_on_virtual_clock(scenario())] == [4, 4, 4]


def test_a_call_still_waiting_when_the_queue_timeout_passes_is_refused_then():
    # The first batch took 50 ms, so a call behind the next one looks fine; that one takes 300 ms.
    backend, batching = batcher(max_batch_size=4, delay=lambda index: 0.3 if index == 1 else 0.05)
    backend.queue = QueuePolicy(timeout_s=0.12)

    async def scenario():
        await batching.infer("m", SPEC, rows(0, 1), None)
        loop = asyncio.get_running_loop()
        started = loop.time()
        slow = asyncio.ensure_future(batching.infer("m", SPEC, rows(0, 4), None))
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match=f"a call {EXPIRED_IN_QUEUE} of 120 ms") as refused:
            await batching.infer("m", SPEC, rows(4, 4), None)  # admitted: about 50 ms to wait
        waited = loop.time() - started
        return waited, refused.value, await slow

    waited, refused, slow = run_on_virtual_clock(scenario())
    assert waited == pytest.approx(0.3, abs=1e-9)  # refused when the slow batch returned, the first moment it could leave
    assert refused.retry_after_s > 0 and len(slow["log_prob"]) == 4
    assert [len(chunk) for chunk in backend.chunks("x")] == [1, 4]  # it never reached the backend


def test_at_least_one_batch_in_flight():
    with pytest.raises(ValueError, match="max_batches_in_flight must be >= 1"):
        BatchingBackend(InMemoryBackend(row_sums), max_batches_in_flight=0)
