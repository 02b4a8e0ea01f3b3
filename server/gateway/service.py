"""The gateway's service layer: validation, noise, chunking and fan-out to Triton.

Protocol-agnostic: it takes and returns domain objects (``domain.py``) and raises domain
errors; the gRPC servicer is a thin adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

from flowserve.contract.metadata import EXACT, FlowMetadata
from flowserve.contract.spec import (
    ALL_DIRECTIONS,
    CONTEXT,
    DENSITY,
    EMBED,
    EMBEDDED_CONTEXT,
    ENCODE,
    GENERATION,
    DirectionSpec,
    bits_per_dim,
)
from flowserve.server.protocol.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FlowServeError,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    quoted,
)
from flowserve.server.protocol.tensors import MAX_MESSAGE_BYTES, WIRE_DTYPE

from .backend import Backend
from .catalog import ModelCatalog
from .domain import (
    EncodeQuery,
    EncodeResult,
    LogLikelihoodQuery,
    LogLikelihoodResult,
    ModelInfo,
    SampleQuery,
    SampleResult,
)
from .health import FlowHealth

log = logging.getLogger(__name__)

# Room left in a message for everything but the tensor.
_MESSAGE_HEADROOM_BYTES = 1024 * 1024
TRUNCATION_BLOCK = 4096
"""Rows that truncated sampling completes together, each drawn again until it falls inside
the support box. A constant, not Triton's batch size, so that Sample and SampleStream draw
the same noise for the same seed."""
_ROUND_ROWS = 4 * TRUNCATION_BLOCK
"""The most candidates one round of truncated sampling draws (and holds in the gateway)."""


@dataclass(frozen=True)
class GatewayLimits:
    """Per-request and gateway-wide bounds on work."""

    max_rows_per_request: int = 100_000
    max_rows_in_flight: int = 1_000_000
    max_chunks_in_flight_per_request: int = 2
    """Chunks of one request on their way to Triton: one running and one ready behind it is
    enough while the batcher runs one batch per model at a time; each holds its noise and
    its bytes (at 4096 rows of D=64, 2 MiB)."""
    max_batches_in_flight_per_model: int = 1
    """Merged calls a model may have on Triton at once (``batching.BatchingBackend``)."""
    max_rows_per_stream: int = 10**9
    """SampleStream's limit: its memory in the gateway is a few chunks whatever the rows."""
    max_draws_per_row: int = 100
    """Truncated sampling's bound: at most this many draws per row asked for (and by default
    exactly that many), so acceptance rates down to about 1% are served."""

    def __post_init__(self):
        if self.max_rows_per_request < 1 or self.max_rows_in_flight < self.max_rows_per_request:
            raise ValueError("need 1 <= max_rows_per_request <= max_rows_in_flight")
        if self.max_rows_per_stream < 1:
            raise ValueError("need max_rows_per_stream >= 1")
        if self.max_chunks_in_flight_per_request < 1 or self.max_batches_in_flight_per_model < 1:
            raise ValueError("need at least one chunk per request and one batch per model in flight")
        if self.max_draws_per_row < 1:
            raise ValueError("need max_draws_per_row >= 1")


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


class FlowService:
    """Sample, LogLikelihood and Encode for every flow of the catalog, run on Triton. ``health``, when
    given, says which flows answer (ListModels' ``ready``)."""

    def __init__(self, backend: Backend, catalog: ModelCatalog, limits: GatewayLimits,
                 health: FlowHealth | None = None):
        self.backend = backend
        self.catalog = catalog
        self.limits = limits
        self.health = health
        self._rows_in_flight = 0
        self._catalog_version = catalog.version

    async def list_models(self) -> list[ModelInfo]:
        """Every flow, with the versions Triton has ready (none while Triton is down)."""
        self.catalog.reload()
        try:
            ready_versions = await self.backend.model_versions()
        except FlowServeError:  # Triton down or failing: list the flows, none of them ready
            ready_versions = {}
        infos = []
        for name in self.catalog.names():
            flow = self.catalog.get(name)
            per_model = [set(ready_versions.get(model, ())) for model in flow.models.values()]
            infos.append(ModelInfo(
                name=name,
                family=flow.family,
                event_shape=flow.event_shape,
                directions=tuple(d for d in ALL_DIRECTIONS if d in flow.models),
                versions=tuple(sorted(set.intersection(*per_model), key=int)),
                ready=all(per_model) and (self.health is None or self.health.is_ready(name)),
                context_shape=flow.context_shape,
                log_likelihood=flow.log_likelihood,
                metadata=flow.listing(),
            ))
        return infos

    async def model_info(self, name: str) -> ModelInfo:
        """The flow ``name`` as :meth:`list_models` lists it; ModelNotFound if it is not served."""
        infos = {info.name: info for info in await self.list_models()}
        if name not in infos:
            self.catalog.get(name)  # InvalidArgument for no name, ModelNotFound quoting it within bounds
            raise ModelNotFound(f"model {quoted(name)} is not served")
        return infos[name]

    async def sample(self, query: SampleQuery, timeout: float | None = None) -> SampleResult:
        """Draw ``num_samples`` samples (or ``samples_per_context`` for each context); the base
        noise comes from the seed alone.

        The noise is [rows, noise_dim] standard normal from PCG64(seed), times the
        temperature, drawn chunk by chunk as the chunks go to Triton; the results are written
        into the response's arrays as they come back. With ``samples_per_context`` N, each of
        the B contexts is repeated N times, one per row: the rows are those of that call.
        ``truncate_to_support``: see :meth:`_truncated`.
        """
        deadline = _deadline(timeout)
        flow = self.catalog.get(query.model)
        n, context = self._sample_rows(flow, query, stream=False)
        seed = self._seed(query)
        truncation = self._truncation(flow, query, n)
        with self._reserve(self._held_rows(n, truncation)):
            context = await self._embedded(flow, context, deadline)
            batch = await self.backend.max_batch_size(flow.models[GENERATION])
            samples = np.empty((n, flow.dim), np.float32)
            log_prob = np.empty(n, np.float32)
            async for start, outputs in self._draw(flow, query, seed, n, context, batch, deadline, truncation):
                rows = len(outputs["log_prob"])
                samples[start:start + rows] = outputs["x"]
                log_prob[start:start + rows] = outputs["log_prob"]
        per = query.samples_per_context
        shape = (n, *flow.event_shape) if per is None else (n // per, per, *flow.event_shape)
        return SampleResult(samples.reshape(shape), log_prob if query.return_log_prob else None, seed,
                            **_tally(truncation))

    async def sample_stream(self, query: SampleQuery, timeout: float | None = None) -> AsyncIterator[SampleResult]:
        """The samples of :meth:`sample` for the same query and seed, as consecutive chunks of
        Triton's ``max_batch_size`` rows, up to ``max_rows_per_stream`` in all. At most
        ``max_chunks_in_flight_per_request`` chunks are in the gateway at once, and none is
        drawn before the reader has taken the ones before: memory does not grow with the rows.
        A chunk also fits in one message (fewer rows for very wide flows), and says where its
        first row is among the call's rows."""
        deadline = _deadline(timeout)
        flow = self.catalog.get(query.model)
        n, context = self._sample_rows(flow, query, stream=True)
        seed = self._seed(query)
        truncation = self._truncation(flow, query, n)
        batch = await self.backend.max_batch_size(flow.models[GENERATION])
        chunk = min(batch, _message_rows(flow))
        held = TRUNCATION_BLOCK if truncation else chunk * self.limits.max_chunks_in_flight_per_request
        with self._reserve(self._held_rows(min(n, held), truncation)):
            context = await self._embedded(flow, context, deadline)
            async for start, outputs in self._draw(flow, query, seed, n, context, chunk, deadline, truncation):
                for first in range(0, len(outputs["log_prob"]), chunk):  # a truncated block spans several chunks
                    samples = outputs["x"][first:first + chunk].reshape(-1, *flow.event_shape)
                    log_prob = outputs["log_prob"][first:first + chunk] if query.return_log_prob else None
                    yield SampleResult(samples, log_prob, seed, start + first, **_tally(truncation))

    def _sample_rows(self, flow: FlowMetadata, query: SampleQuery, stream: bool) -> tuple[int, ContextRows | None]:
        """The query's rows and their context rows, checked against the call's row limits."""
        per = query.samples_per_context
        if per is None:
            n = query.num_samples
            if not stream:
                self._check_rows("num_samples", n, flow)
            elif not 1 <= n <= self.limits.max_rows_per_stream:
                raise InvalidArgument(f"num_samples must be in 1..{self.limits.max_rows_per_stream} for a stream, "
                                      f"got {n}")
            return n, _context_rows(flow, query.context, n, "num_samples")
        if per < 1:
            raise InvalidArgument(f"samples_per_context must be >= 1, got {per}")
        contexts = _context_batch(flow, query.context)
        n = len(contexts) * per
        product = f"{len(contexts)} contexts x samples_per_context {per} = {n} rows"
        if query.num_samples not in (0, n):
            raise InvalidArgument(f"num_samples is {query.num_samples} but {product}; leave num_samples 0 or send {n}")
        limit = self.limits.max_rows_per_stream if stream else self.limits.max_rows_per_request
        if n > limit:
            advice = "" if stream else f": use SampleStream, which takes up to {self.limits.max_rows_per_stream}"
            raise InvalidArgument(f"{product}, above this gateway's limit of {limit} rows per "
                                  f"{'stream' if stream else 'request'}{advice}")
        if not stream:
            self._check_rows(product, n, flow)
        return n, ContextRows(contexts, per)

    @staticmethod
    def _seed(query: SampleQuery) -> int:
        """The query's seed (a fresh one when unset); checks the temperature."""
        if not (math.isfinite(query.temperature) and query.temperature > 0):
            raise InvalidArgument(f"temperature must be a finite number > 0, got {query.temperature}")
        return secrets.randbits(64) if query.seed is None else query.seed

    def _truncation(self, flow: FlowMetadata, query: SampleQuery, rows: int) -> Truncation | None:
        """The bookkeeping of a truncated query (None when it does not truncate), its draws
        bounded; raises for a flow without a support box or a bound out of range."""
        if not query.truncate_to_support:
            if query.max_draws is not None:
                raise InvalidArgument("max_draws bounds truncated sampling: it goes with truncate_to_support")
            return None
        low, high = _support_box(flow)
        limit = rows * self.limits.max_draws_per_row
        max_draws = limit if query.max_draws is None else query.max_draws
        if not rows <= max_draws <= limit:
            raise InvalidArgument(f"max_draws must be in {rows}..{limit} for {rows} samples (at least one draw per "
                                  f"sample, at most {self.limits.max_draws_per_row}), got {max_draws}")
        return Truncation(flow.name, rows, max_draws, low, high)

    def _held_rows(self, rows: int, truncation: Truncation | None) -> int:
        """The rows a sampling call holds at once, for the in-flight budget: ``rows`` of
        results and, when it truncates, a round's candidates (within the budget itself, so
        that a call the limits admit is never refused as busy on an idle gateway)."""
        if truncation is None:
            return rows
        return min(self.limits.max_rows_in_flight, rows + min(_ROUND_ROWS, truncation.max_draws))

    def _draw(self, flow: FlowMetadata, query: SampleQuery, seed: int, rows: int, context: ContextRows | None,
              batch: int, deadline: float | None, truncation: Truncation | None,
              ) -> AsyncIterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, outputs) of consecutive parts of the call's rows, in order: chunks of
        ``batch`` rows, or under truncation, blocks of :data:`TRUNCATION_BLOCK` rows."""
        if truncation is None:
            return self._generate(flow, query, seed, rows, context, batch, deadline)
        return self._truncated(flow, query, seed, rows, context, batch, deadline, truncation)

    async def _truncated(
        self, flow: FlowMetadata, query: SampleQuery, seed: int, rows: int, context: ContextRows | None, batch: int,
        deadline: float | None, truncation: Truncation,
    ) -> AsyncIterator[tuple[int, dict[str, np.ndarray]]]:
        """Samples inside the support box, block by block of :data:`TRUNCATION_BLOCK` rows.

        Each round draws candidates for the rows of the block that still lack a sample
        (several per row once the acceptance rate is known; noise from PCG64(seed) in row
        order, each candidate with its row's context) and gives each row its first candidate
        inside the box: every row is a draw of the model's distribution truncated to the box.
        ``truncation`` counts the draws and raises ResourceExhausted at its bound.
        """
        spec = flow.spec(GENERATION)
        rng = np.random.Generator(np.random.PCG64(seed))
        temperature = np.float32(query.temperature)
        for start in range(0, rows, TRUNCATION_BLOCK):
            size = min(TRUNCATION_BLOCK, rows - start)
            x, log_prob = np.empty((size, flow.dim), np.float32), np.empty(size, np.float32)
            pending = np.arange(size)
            while pending.size:
                owners = truncation.next_round(pending)
                noise = rng.standard_normal((len(owners), flow.noise_dim), dtype=np.float32)
                noise *= temperature
                contexts = None if context is None else context.take(start + owners)
                chunks = (_inputs(spec, noise[i:i + batch], None if contexts is None else contexts[i:i + batch])
                          for i in range(0, len(owners), batch))
                outputs = _joined([part async for part in self._run(flow, GENERATION, chunks, deadline)], spec)
                inside = truncation.count(outputs["x"])
                kept, first = np.unique(owners[inside], return_index=True)
                chosen = np.flatnonzero(inside)[first]
                x[kept], log_prob[kept] = outputs["x"][chosen], outputs["log_prob"][chosen]
                pending = np.setdiff1d(pending, kept, assume_unique=True)
                truncation.kept += len(kept)
            yield start, {"x": x, "log_prob": log_prob}

    async def _generate(
        self, flow: FlowMetadata, query: SampleQuery, seed: int, rows: int, context: ContextRows | None, chunk: int,
        deadline: float | None,
    ) -> AsyncIterator[tuple[int, dict[str, np.ndarray]]]:
        """(first row, outputs) of each chunk of ``chunk`` of ``rows`` rows of the generation
        direction, in order."""
        spec = flow.spec(GENERATION)
        rng = np.random.Generator(np.random.PCG64(seed))
        temperature = np.float32(query.temperature)

        def chunks() -> Iterator[dict[str, np.ndarray]]:
            for start in range(0, rows, chunk):
                noise = rng.standard_normal((min(chunk, rows - start), flow.noise_dim), dtype=np.float32)
                noise *= temperature
                yield _inputs(spec, noise, None if context is None else context[start:start + chunk])

        start = 0
        async for outputs in self._run(flow, GENERATION, chunks(), deadline):
            yield start, outputs
            start += len(outputs["log_prob"])

    async def log_likelihood(self, query: LogLikelihoodQuery, timeout: float | None = None) -> LogLikelihoodResult:
        """log p(x | context) of each row of ``query.x`` (a lower bound where the flow says so),
        and its bits per dimension if asked for."""
        flow = self.catalog.get(query.model)
        box = _support_box(flow) if query.truncate_to_support else None
        outputs = await self._map_rows(flow, DENSITY, query.x, query.context, _deadline(timeout))
        log_prob = outputs["log_prob"]
        if box is not None:
            log_prob = np.where(_inside(query.x.reshape(len(query.x), flow.dim), *box), log_prob, np.float32(-np.inf))
        bits = bits_per_dim(log_prob.astype(np.float64), flow.dim).astype(np.float32) if query.return_bits_per_dim else None
        return LogLikelihoodResult(log_prob=log_prob, bits_per_dim=bits)

    async def encode(self, query: EncodeQuery, timeout: float | None = None) -> EncodeResult:
        """z, log|det dz/dx| and log p(x | context) of each row of ``query.x``; FailedPrecondition
        for a flow that has no encode model."""
        flow = self.catalog.get(query.model)
        if ENCODE not in flow.models:
            why = (f"its log-likelihood is a {flow.log_likelihood.replace('_', ' ')} ({flow.family}): it has no "
                   "exact data -> noise map" if flow.log_likelihood != EXACT else
                   "it was exported without an encode model (flowserve exports one since Encode exists): export "
                   "it again")
            raise FailedPrecondition(f"model {flow.name!r} cannot encode: {why}")
        outputs = await self._map_rows(flow, ENCODE, query.x, query.context, _deadline(timeout))
        return EncodeResult(z=outputs["z"], log_det=outputs["log_det"], log_prob=outputs["log_prob"])

    async def _map_rows(self, flow: FlowMetadata, direction: str, x: np.ndarray, context: np.ndarray | None,
                        deadline: float | None) -> dict[str, np.ndarray]:
        """Every output of ``direction`` (density or encode) for the data rows ``x``, after
        checking them: their shape, count, values and support, and their context."""
        if x.ndim != 1 + len(flow.event_shape) or tuple(x.shape[1:]) != flow.event_shape:
            raise InvalidArgument(
                f"x.shape is {list(x.shape)}; model {flow.name!r} expects [N, {_dims(flow.event_shape)}]"
            )
        rows = x.shape[0]
        self._check_rows("x.shape[0]", rows, flow)
        _check_finite_rows(x, "x")
        if flow.support is not None:
            low, high = flow.support
            inside = _inside(x.reshape(rows, -1), low, high)
            if not inside.all():
                raise InvalidArgument(
                    f"x has values outside [{low:g}, {high:g}], the support of model {flow.name!r} "
                    f"(pixel values), in row {int(np.argmin(inside))}"
                )
        context = _context_rows(flow, context, rows, "x.shape[0]")
        with self._reserve(rows):
            context = await self._embedded(flow, context, deadline)
            spec = flow.spec(direction)
            chunk = await self.backend.max_batch_size(flow.models[direction])
            flat = x.reshape(rows, flow.dim)
            chunks = iter([_inputs(spec, flat[start:start + chunk], None if context is None else context[start:start + chunk])
                           for start in range(0, rows, chunk)])
            parts = [outputs async for outputs in self._run(flow, direction, chunks, deadline)]
        return _joined(parts, spec)

    async def _embedded(self, flow: FlowMetadata, context: ContextRows | None,
                        deadline: float | None) -> ContextRows | None:
        """The context rows as the flow's directions take them: for a flow with an embed model,
        its embeddings, computed once for each distinct context of the call. (A call that
        sends B contexts and one that sends each of them N times embed the same rows, so they
        get the same numbers.)"""
        if context is None or EMBED not in flow.models:
            return context
        distinct, index = np.unique(context.table, axis=0, return_inverse=True)
        spec = flow.spec(EMBED)
        chunk = await self.backend.max_batch_size(flow.models[EMBED])
        chunks = iter([{CONTEXT: distinct[start:start + chunk]} for start in range(0, len(distinct), chunk)])
        parts = [outputs async for outputs in self._run(flow, EMBED, chunks, deadline)]
        return ContextRows(_joined(parts, spec)[EMBEDDED_CONTEXT][index.reshape(-1)], context.per)

    def _check_rows(self, field: str, rows: int, flow: FlowMetadata) -> None:
        if rows < 1:
            raise InvalidArgument(f"{field} must be >= 1, got {rows}")
        if rows > self.limits.max_rows_per_request:
            raise InvalidArgument(
                f"{field} is {rows}, above this gateway's limit of {self.limits.max_rows_per_request} rows per request"
            )
        max_rows = _message_rows(flow)
        if rows > max_rows:
            raise InvalidArgument(
                f"{field} is {rows}: at {flow.dim + flow.context_dim + 1} float32 values per row (event, context and "
                f"log_prob) that exceeds the {MAX_MESSAGE_BYTES >> 20} MiB message limit; send at most {max_rows} "
                "rows per request"
            )

    @contextlib.contextmanager
    def _reserve(self, rows: int):
        """Hold ``rows`` of the gateway-wide in-flight budget while a request runs."""
        if self._rows_in_flight + rows > self.limits.max_rows_in_flight:
            raise ResourceExhausted(
                f"gateway busy: {self._rows_in_flight} rows in flight, limit {self.limits.max_rows_in_flight}; retry later"
            )
        self._rows_in_flight += rows
        try:
            yield
        finally:
            self._rows_in_flight -= rows

    async def _run(
        self, flow: FlowMetadata, direction: str, chunks: Iterator[dict[str, np.ndarray]], deadline: float | None
    ) -> AsyncIterator[dict[str, np.ndarray]]:
        """The outputs of each chunk of ``chunks`` (every input of the direction's spec, by
        name, at most Triton's max_batch_size rows), in order, each call made with the time
        left until ``deadline`` (the event loop's clock). Chunks are taken from the
        iterator only as room opens: at most ``max_chunks_in_flight_per_request`` are on
        Triton at once. If one fails, or the caller stops early, the others are cancelled and
        waited for, so their rows are not released while still on Triton."""
        if self._catalog_version != self.catalog.version:  # re-exported flows: Triton configs may differ
            self.backend.forget_configs()
            self._catalog_version = self.catalog.version
        model = flow.models[direction]
        spec = flow.spec(direction)
        loop = asyncio.get_running_loop()

        def call(inputs: dict[str, np.ndarray]):
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline exceeded before {model!r} was called")
            inputs = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.dtype) for t in spec.inputs}
            return self.backend.infer(model, spec, inputs, remaining)

        first, second = next(chunks), next(chunks, None)
        if second is None:  # one chunk: no task to spread it over
            yield await call(first)
            return
        running: deque[asyncio.Future] = deque()
        try:
            for inputs in itertools.chain((first, second), chunks):
                if len(running) == self.limits.max_chunks_in_flight_per_request:
                    yield await running.popleft()
                running.append(asyncio.ensure_future(call(inputs)))
            while running:
                yield await running.popleft()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)


@dataclass
class Truncation:
    """The draws of one truncated call: its bound, what it has drawn, kept and found inside
    the support box ``[low, high]`` (float32 per value, ±inf for an open side)."""

    model: str
    rows: int
    max_draws: int
    low: np.ndarray
    high: np.ndarray
    draws: int = 0
    inside: int = 0
    kept: int = 0

    MAX_CANDIDATES_PER_ROW = 64

    @property
    def acceptance_rate(self) -> float:
        return self.inside / self.draws if self.draws else 0.0

    def next_round(self, pending: np.ndarray) -> np.ndarray:
        """The row (of ``pending``, the rows still without a sample) of each candidate of the
        next round: one per row at first, then the whole part of 1 / acceptance rate (up to
        64), so that a row expects between half a hit and one per round and few draws are
        wasted; within :data:`_ROUND_ROWS` and the draws left. ResourceExhausted when none
        are left."""
        left = self.max_draws - self.draws
        if left <= 0:
            raise ResourceExhausted(
                f"truncated sampling of model {self.model!r} kept {self.kept} of {self.rows} samples inside the "
                f"support box in {self.draws} draws (acceptance rate {self.acceptance_rate:.3g}), the most this call "
                "may make: allow more with max_draws, or ask for fewer samples")
        rate = self.acceptance_rate if self.draws else 1.0
        per = math.floor(1 / max(rate, 1 / self.MAX_CANDIDATES_PER_ROW))
        per = max(1, min(per, _ROUND_ROWS // len(pending), left // len(pending)))
        return np.repeat(pending, per)[:left]

    def count(self, x: np.ndarray) -> np.ndarray:
        """Which rows of the candidates ``x`` [rows, dim] lie inside the box; counts them."""
        inside = _inside(x, self.low, self.high)
        self.draws += len(x)
        self.inside += int(inside.sum())
        return inside


def _support_box(flow: FlowMetadata) -> tuple[np.ndarray, np.ndarray]:
    """The flow's support box as float32 bounds per value, ±inf for an open side;
    FailedPrecondition for a flow without one."""
    bounds = flow.support_bounds()
    if bounds is None:
        raise FailedPrecondition(
            f"model {flow.name!r} has no support box to truncate to: export it from an sbi posterior whose prior "
            "is a box, or give one at export (flowserve export --support-low ... --support-high ...)")
    low, high = (np.array(side, np.float32) for side in bounds)
    return low, high


def _inside(rows: np.ndarray, low, high) -> np.ndarray:
    """Whether each row [rows, dim] lies inside ``[low, high]`` (per value, or one bound for
    all; NaN does not)."""
    return ((rows >= low) & (rows <= high)).all(axis=1)


def _tally(truncation: Truncation | None) -> dict:
    """What a response reports of a truncated call so far."""
    return {} if truncation is None else {"acceptance_rate": truncation.acceptance_rate, "draws": truncation.draws}


def _deadline(timeout: float | None) -> float | None:
    """When a call with ``timeout`` seconds must end, on the running event loop's clock."""
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


def _joined(parts: list[dict[str, np.ndarray]], spec: DirectionSpec) -> dict[str, np.ndarray]:
    """The outputs of consecutive chunks as one array per output of ``spec``."""
    return {name: parts[0][name] if len(parts) == 1 else np.concatenate([part[name] for part in parts])
            for name in spec.output_names}


def _message_rows(flow: FlowMetadata) -> int:
    """The most rows of ``flow`` one message can carry: a row costs its event values, its
    context values and its log_prob."""
    values = flow.dim + flow.context_dim + 1
    return (MAX_MESSAGE_BYTES - _MESSAGE_HEADROOM_BYTES) // (values * WIRE_DTYPE.itemsize)


def _context_rows(flow: FlowMetadata, context: np.ndarray | None, rows: int, rows_field: str) -> ContextRows | None:
    """The context of each of ``rows`` rows: one context for every row, or one per row; None
    for a flow without context. Raises InvalidArgument naming ``context`` for anything else."""
    shape = flow.context_shape
    if not shape:
        if context is not None:
            raise InvalidArgument(
                f"context.shape is {list(context.shape)} but model {flow.name!r} takes no context; leave context unset"
            )
        return None
    if context is None:
        raise InvalidArgument(
            f"model {flow.name!r} needs context of shape [{_dims(shape)}] (one for every row) or "
            f"[{rows_field}, {_dims(shape)}] (one per row); context is unset"
        )
    if tuple(context.shape) == shape:
        if not np.isfinite(context).all():
            raise InvalidArgument("context has non-finite values (NaN or inf)")
        return ContextRows(context.reshape(1, flow.context_dim), rows)
    if context.ndim != 1 + len(shape) or tuple(context.shape[1:]) != shape:
        raise InvalidArgument(
            f"context.shape is {list(context.shape)}; model {flow.name!r} expects [{_dims(shape)}] or "
            f"[{rows_field}, {_dims(shape)}]"
        )
    if context.shape[0] != rows:
        raise InvalidArgument(
            f"context has {context.shape[0]} rows but {rows_field} is {rows}; send {rows} context rows "
            f"or a single context of shape [{_dims(shape)}]"
        )
    _check_finite_rows(context, "context")
    return ContextRows(context.reshape(rows, flow.context_dim))


@dataclass(frozen=True)
class ContextRows:
    """The contexts of a call's rows: row r takes ``table[r // per]`` (B contexts each
    repeated ``per`` times, or one context for every row). Sliced by rows like the [rows,
    context_dim] array it stands for, without holding it (a stream may have 10^9 rows)."""

    table: np.ndarray
    per: int = 1

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self.table) * self.per)
        return self.table[start:stop] if self.per == 1 else self.table[np.arange(start, stop) // self.per]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The contexts of the rows ``rows`` (indices), as [len(rows), context_dim]."""
        return self.table[rows // self.per]


def _context_batch(flow: FlowMetadata, context: np.ndarray | None) -> np.ndarray:
    """The B contexts of a samples_per_context query as [B, context_dim]: ``context`` is
    [B, *context_shape], or [*context_shape] for B = 1. Raises InvalidArgument naming ``context``."""
    shape = flow.context_shape
    if not shape:
        raise InvalidArgument(f"samples_per_context draws samples for each context, but model {flow.name!r} takes "
                              "no context; use num_samples alone")
    if context is None:
        raise InvalidArgument(f"samples_per_context needs context of shape [B, {_dims(shape)}]; context is unset")
    if tuple(context.shape) == shape:
        context = context.reshape(1, *shape)
    if context.ndim != 1 + len(shape) or tuple(context.shape[1:]) != shape:
        raise InvalidArgument(f"context.shape is {list(context.shape)}; with samples_per_context model {flow.name!r} "
                              f"expects [B, {_dims(shape)}]")
    _check_finite_rows(context, "context")
    return context.reshape(len(context), flow.context_dim)


def _check_finite_rows(array: np.ndarray, field: str) -> None:
    """InvalidArgument naming ``field`` and its first row that holds NaN or inf."""
    finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
    if not finite.all():
        raise InvalidArgument(f"{field} has non-finite values (NaN or inf) in row {int(np.argmin(finite))}")


def _inputs(spec: DirectionSpec, rows: np.ndarray, context: np.ndarray | None) -> dict[str, np.ndarray]:
    """Triton inputs of ``spec`` by name: ``rows`` as its first input, plus the context (or the
    embedded context) if it takes one."""
    inputs = {spec.input_names[0]: rows}
    if context is not None:
        inputs[spec.input_names[1]] = context
    return inputs
