"""The gateway's own batcher: concurrent calls of one model become one Triton call.

Each call to Triton costs the gateway about the same CPU whatever its rows (building the
request, the outbound gRPC call, its callbacks), so merging the calls that wait at the same
moment pays that cost once per batch. No call waits on a timer: a model's calls go out at
once while fewer than ``max_batches_in_flight`` of its batches run, and the calls that come
in meanwhile leave together, up to the model's ``max_batch_size`` rows, as soon as one
returns. At low load a call goes out alone and at once; under load batches grow by themselves.

Rows are independent in every flow direction, so a row's result does not depend on the
batch it ran in; models whose config turns dynamic batching off are called one call at a time.

Back-pressure: a model's config bounds its queue (``backend.QueuePolicy``: requests that may
wait, and a queue timeout). The batcher enforces them on its own queue: as many full batches'
rows, and no more batches ahead than leave within the timeout, at the pace the queue drained
lately. A call beyond either is answered at once with ``ResourceExhausted`` and a retry hint:
the time the batches ahead of it would take. That pace is an estimate (a machine short of CPU
drains slower than it did a moment ago), so a call still waiting when the timeout has passed
is refused then, as Triton's queue policy would: an admitted call waits at most the timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from flowserve.contract.spec import DirectionSpec
from flowserve.server.protocol.errors import DeadlineExceeded, ResourceExhausted

from .backend import Backend, QueuePolicy

# Weight of the newest batch in the running means of batch times and of the queue's pace.
_NEWEST_WEIGHT = 0.2

# In the message of a call refused after waiting: clients (and benchmarks/burst.py) tell it
# from a call refused on arrival by this.
EXPIRED_IN_QUEUE = "waited longer than its queue's timeout"


def _running_mean(mean: float, value: float) -> float:
    return mean + _NEWEST_WEIGHT * (value - mean) if mean else value


@dataclass(eq=False)  # compared by identity: a call is removed from the queue by itself
class _Call:
    inputs: dict[str, np.ndarray]
    rows: int
    timeout_at: float | None
    queued_at: float
    result: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _ModelQueue:
    """The waiting calls of one model and its batches in flight."""

    def __init__(self, backend: Backend, model: str, spec: DirectionSpec, max_rows: int, max_in_flight: int,
                 policy: QueuePolicy):
        self.backend, self.model, self.spec = backend, model, spec
        self.max_rows, self.max_in_flight = max_rows, max_in_flight
        self.max_waiting_rows = policy.max_size * max_rows or None
        self.max_wait_s = policy.timeout_s or None
        self.waiting: deque[_Call] = deque()
        self.waiting_rows = 0
        self.in_flight = 0
        self.batch_seconds = 0.0  # running mean of one batch's time on the backend
        self.pace_seconds = 0.0  # running mean of the time between batches leaving a backlogged queue
        self._last_done: float | None = None  # when the last batch returned
        self._backlogged = False  # whether calls waited then
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    def expected_wait_s(self, rows: int) -> float:
        """How long a call of ``rows`` rows queued now would wait for its batch to leave."""
        batches_ahead = self.in_flight + (self.waiting_rows + rows - 1) // self.max_rows
        # Between batches the gateway's CPU answers other calls, so the pace a backlog drained
        # at, when known, says more than the batches' own times.
        return batches_ahead * (self.pace_seconds or self.batch_seconds / self.max_in_flight)

    def enqueue(self, call: _Call) -> None:
        """Queue ``call``, or raise ResourceExhausted if its rows would exceed the waiting limit
        or it would wait longer than the queue timeout."""
        expected_wait_s = self.expected_wait_s(call.rows)
        if self.max_waiting_rows is not None and self.waiting_rows + call.rows > self.max_waiting_rows:
            reason = f"{self.waiting_rows} rows wait for it, its queue's limit is {self.max_waiting_rows}"
        elif self.max_wait_s is not None and expected_wait_s > self.max_wait_s:
            reason = (f"a call would wait about {1000 * expected_wait_s:.0f} ms for it, its queue's timeout is "
                      f"{1000 * self.max_wait_s:.0f} ms")
        else:
            self.waiting.append(call)
            self.waiting_rows += call.rows
            return
        raise self._busy(reason, expected_wait_s)

    def _busy(self, reason: str, retry_after_s: float) -> ResourceExhausted:
        retry_after_s = max(retry_after_s, 0.001)
        return ResourceExhausted(f"{self.model!r} is busy: {reason}; retry in about {1000 * retry_after_s:.0f} ms",
                                 retry_after_s=retry_after_s)

    def _take(self) -> _Call:
        call = self.waiting.popleft()
        self.waiting_rows -= call.rows
        return call

    def drop(self, call: _Call) -> None:
        """Take a cancelled call out of the queue, if it still waits."""
        if call in self.waiting:
            self.waiting.remove(call)
            self.waiting_rows -= call.rows

    async def infer(self, inputs: dict[str, np.ndarray], timeout: float | None) -> dict[str, np.ndarray]:
        """One batch on the backend, its time kept in the running mean."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        outputs = await self.backend.infer(self.model, self.spec, inputs, timeout)
        self.batch_seconds = _running_mean(self.batch_seconds, loop.time() - started)
        return outputs

    def batch_done(self, ran: bool = True) -> None:
        """Free the finished batch's slot, keep the queue's pace (if the batch ``ran`` on the
        backend), and send what waits."""
        self.in_flight -= 1
        now = asyncio.get_running_loop().time()
        if ran and self._backlogged:  # the batch before left as the previous one returned: no idle time between
            self.pace_seconds = _running_mean(self.pace_seconds, now - self._last_done)
        self._last_done, self._backlogged = now, bool(self.waiting)
        self.dispatch()

    def _expire(self) -> None:
        """Refuse the calls that have waited longer than the queue timeout (the oldest come first)."""
        if self.max_wait_s is None:
            return
        now = asyncio.get_running_loop().time()
        while self.waiting and now - self.waiting[0].queued_at > self.max_wait_s:
            call = self._take()
            if not call.result.done():
                call.result.set_exception(self._busy(
                    f"a call {EXPIRED_IN_QUEUE} of {1000 * self.max_wait_s:.0f} ms", self.expected_wait_s(call.rows)))

    def dispatch(self) -> None:
        """Send the waiting calls, as batches of at most ``max_rows`` rows, while a batch slot is free."""
        self._expire()
        while self.waiting and self.in_flight < self.max_in_flight:
            batch = [self._take()]
            rows = batch[0].rows
            while self.waiting and rows + self.waiting[0].rows <= self.max_rows:
                batch.append(self._take())
                rows += batch[-1].rows
            self.in_flight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Call]) -> None:
        batch = [call for call in batch if not call.result.done()]  # cancelled while waiting
        try:
            if not batch:
                return
            loop = asyncio.get_running_loop()
            timeouts = [call.timeout_at for call in batch]
            timeout = None if None in timeouts else max(timeouts) - loop.time()
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {name: np.concatenate([call.inputs[name] for call in batch]) for name in self.spec.input_names}
            try:
                outputs = await self.infer(inputs, timeout)
            except Exception as error:  # every call of the batch gets the batch's error
                for call in batch:
                    if not call.result.done():
                        call.result.set_exception(error)
                return
            start = 0
            for call in batch:
                if not call.result.done():
                    call.result.set_result({name: value[start:start + call.rows] for name, value in outputs.items()})
                start += call.rows
        finally:
            self.batch_done(ran=bool(batch))


class BatchingBackend:
    """A :class:`~flowserve.server.gateway.backend.Backend` that merges concurrent ``infer`` calls of
    a model (each at most its ``max_batch_size`` rows) before they reach ``backend``."""

    def __init__(self, backend: Backend, max_batches_in_flight: int = 1):
        if max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got {max_batches_in_flight}")
        self.backend = backend
        self.max_batches_in_flight = max_batches_in_flight
        self._queues: dict[str, _ModelQueue] = {}

    async def is_ready(self) -> bool:
        return await self.backend.is_ready()

    async def model_versions(self) -> dict[str, list[str]]:
        return await self.backend.model_versions()

    async def model_ready(self, model: str) -> bool:
        return await self.backend.model_ready(model)

    async def probe(self, model: str, spec: DirectionSpec, timeout: float) -> None:
        await self.backend.probe(model, spec, timeout)

    async def load_model(self, model: str) -> None:
        await self.backend.load_model(model)

    async def unload_model(self, model: str) -> None:
        await self.backend.unload_model(model)

    async def max_batch_size(self, model: str) -> int:
        return await self.backend.max_batch_size(model)

    async def dynamic_batching(self, model: str) -> bool:
        return await self.backend.dynamic_batching(model)

    async def queue_policy(self, model: str) -> QueuePolicy:
        return await self.backend.queue_policy(model)

    def forget_configs(self) -> None:
        self.backend.forget_configs()
        self._queues.clear()

    async def close(self) -> None:
        await self.backend.close()

    async def infer(
        self, model: str, spec: DirectionSpec, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        queue = self._queues.get(model)
        if queue is None or queue.spec != spec:
            if not await self.backend.dynamic_batching(model):
                return await self.backend.infer(model, spec, inputs, timeout)
            queue = self._queues[model] = _ModelQueue(
                self.backend, model, spec, await self.backend.max_batch_size(model), self.max_batches_in_flight,
                await self.backend.queue_policy(model))
        if not queue.waiting and queue.in_flight < queue.max_in_flight:
            # A free slot and nobody waiting: the call is a batch of its own, run in the caller's task.
            queue.in_flight += 1
            try:
                return await queue.infer(inputs, timeout)
            finally:
                queue.batch_done()
        now = asyncio.get_running_loop().time()
        call = _Call(inputs, next(iter(inputs.values())).shape[0], None if timeout is None else now + timeout, now)
        queue.enqueue(call)
        queue.dispatch()
        try:
            # Cancelled or timed out, the call's future is cancelled and its batch drops it.
            return await (call.result if timeout is None else asyncio.wait_for(call.result, timeout))
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded while {model!r} was running on Triton") from None
        finally:
            if call.result.cancelled():
                queue.drop(call)
