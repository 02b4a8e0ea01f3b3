"""The gateway's service layer: validation, noise, chunking and fan-out to Triton.

Protocol-agnostic: it takes and returns domain objects (``domain.py``) and raises domain
errors; the gRPC servicer is a thin adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from dataclasses import dataclass

import numpy as np

from flowserve.metadata import FlowMetadata
from flowserve.spec import CONTEXT, DENSITY, DIRECTIONS, GENERATION, DirectionSpec, bits_per_dim

from .backend import Backend
from .catalog import ModelCatalog
from .domain import (
    DeadlineExceeded,
    FlowServeError,
    InvalidArgument,
    LogLikelihoodQuery,
    LogLikelihoodResult,
    ModelInfo,
    ResourceExhausted,
    SampleQuery,
    SampleResult,
)
from .tensors import MAX_MESSAGE_BYTES, WIRE_DTYPE

log = logging.getLogger(__name__)

# Room left in a message for everything but the tensor.
_MESSAGE_HEADROOM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    """Per-request and gateway-wide bounds on work."""

    max_rows_per_request: int = 100_000
    max_rows_in_flight: int = 1_000_000
    max_chunks_in_flight_per_request: int = 8
    max_batches_in_flight_per_model: int = 1
    """Merged calls a model may have on Triton at once (``batching.BatchingBackend``)."""

    def __post_init__(self):
        if self.max_rows_per_request < 1 or self.max_rows_in_flight < self.max_rows_per_request:
            raise ValueError("need 1 <= max_rows_per_request <= max_rows_in_flight")
        if self.max_chunks_in_flight_per_request < 1 or self.max_batches_in_flight_per_model < 1:
            raise ValueError("need at least one chunk per request and one batch per model in flight")


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


class FlowService:
    """Sample and LogLikelihood for every flow of the catalog, run on Triton."""

    def __init__(self, backend: Backend, catalog: ModelCatalog, limits: GatewayLimits):
        self.backend = backend
        self.catalog = catalog
        self.limits = limits
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
            directions = tuple(d for d in DIRECTIONS if d in flow.models)
            per_direction = [set(ready_versions.get(flow.models[d], ())) for d in directions]
            infos.append(ModelInfo(
                name=name,
                family=flow.family,
                event_shape=flow.event_shape,
                directions=directions,
                versions=tuple(sorted(set.intersection(*per_direction), key=int)),
                ready=all(per_direction),
                context_shape=flow.context_shape,
                log_likelihood=flow.log_likelihood,
                metadata=flow.listing(),
            ))
        return infos

    async def sample(self, query: SampleQuery, timeout: float | None = None) -> SampleResult:
        """Draw ``num_samples`` samples; the base noise comes from the seed alone.

        The noise is [num_samples, noise_dim] standard normal from PCG64(seed), times the temperature.
        """
        flow = self.catalog.get(query.model)
        self._check_rows("num_samples", query.num_samples, flow)
        if not (math.isfinite(query.temperature) and query.temperature > 0):
            raise InvalidArgument(f"temperature must be a finite number > 0, got {query.temperature}")
        context = _context_rows(flow, query.context, query.num_samples, "num_samples")
        seed = secrets.randbits(64) if query.seed is None else query.seed
        with self._reserve(query.num_samples):
            rng = np.random.Generator(np.random.PCG64(seed))
            noise = rng.standard_normal((query.num_samples, flow.noise_dim), dtype=np.float32)
            noise *= np.float32(query.temperature)
            outputs = await self._run(flow, GENERATION, _inputs(flow.spec(GENERATION), noise, context), timeout)
        samples = outputs["x"].reshape(query.num_samples, *flow.event_shape)
        log_prob = outputs["log_prob"] if query.return_log_prob else None
        return SampleResult(samples=samples, log_prob=log_prob, seed=seed)

    async def log_likelihood(self, query: LogLikelihoodQuery, timeout: float | None = None) -> LogLikelihoodResult:
        """log p(x | context) of each row of ``query.x`` (a lower bound where the flow says so),
        and its bits per dimension if asked for."""
        flow = self.catalog.get(query.model)
        x = query.x
        if x.ndim != 1 + len(flow.event_shape) or tuple(x.shape[1:]) != flow.event_shape:
            raise InvalidArgument(
                f"x.shape is {list(x.shape)}; model {flow.name!r} expects [N, {_dims(flow.event_shape)}]"
            )
        rows = x.shape[0]
        self._check_rows("x.shape[0]", rows, flow)
        finite = np.isfinite(x).reshape(rows, -1).all(axis=1)
        if not finite.all():
            raise InvalidArgument(f"x has non-finite values (NaN or inf) in row {int(np.argmin(finite))}")
        if flow.support is not None:
            low, high = flow.support
            inside = ((x >= low) & (x <= high)).reshape(rows, -1).all(axis=1)
            if not inside.all():
                raise InvalidArgument(
                    f"x has values outside [{low:g}, {high:g}], the support of model {flow.name!r} "
                    f"(pixel values), in row {int(np.argmin(inside))}"
                )
        context = _context_rows(flow, query.context, rows, "x.shape[0]")
        with self._reserve(rows):
            inputs = _inputs(flow.spec(DENSITY), x.reshape(rows, flow.dim), context)
            log_prob = (await self._run(flow, DENSITY, inputs, timeout))["log_prob"]
        bits = bits_per_dim(log_prob.astype(np.float64), flow.dim).astype(np.float32) if query.return_bits_per_dim else None
        return LogLikelihoodResult(log_prob=log_prob, bits_per_dim=bits)

    def _check_rows(self, field: str, rows: int, flow: FlowMetadata) -> None:
        if rows < 1:
            raise InvalidArgument(f"{field} must be >= 1, got {rows}")
        if rows > self.limits.max_rows_per_request:
            raise InvalidArgument(
                f"{field} is {rows}, above this gateway's limit of {self.limits.max_rows_per_request} rows per request"
            )
        # A row costs its D event values, its context values and its log_prob on the wire.
        values = flow.dim + flow.context_dim + 1
        max_rows = (MAX_MESSAGE_BYTES - _MESSAGE_HEADROOM_BYTES) // (values * WIRE_DTYPE.itemsize)
        if rows > max_rows:
            raise InvalidArgument(
                f"{field} is {rows}: at {values} float32 values per row (event, context and log_prob) that exceeds "
                f"the {MAX_MESSAGE_BYTES >> 20} MiB message limit; send at most {max_rows} rows per request"
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
        self, flow: FlowMetadata, direction: str, inputs: dict[str, np.ndarray], timeout: float | None
    ) -> dict[str, np.ndarray]:
        """Run the rows of ``inputs`` (every input of the direction's spec, by name, with the
        same number of rows) through one direction in chunks of Triton's max_batch_size, concurrently."""
        if self._catalog_version != self.catalog.version:  # re-exported flows: Triton configs may differ
            self.backend.forget_configs()
            self._catalog_version = self.catalog.version
        model = flow.models[direction]
        spec = flow.spec(direction)
        rows = inputs[spec.input_names[0]].shape[0]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        chunk = await self.backend.max_batch_size(model)
        if rows <= chunk:  # one chunk: no tasks to spread it over
            if deadline is not None and deadline <= loop.time():
                raise DeadlineExceeded(f"deadline exceeded before {model!r} was called")
            inputs = {t.name: np.ascontiguousarray(inputs[t.name], dtype=t.dtype) for t in spec.inputs}
            return await self.backend.infer(model, spec, inputs, None if deadline is None else deadline - loop.time())
        slots = asyncio.Semaphore(self.limits.max_chunks_in_flight_per_request)

        async def run_chunk(start: int) -> dict[str, np.ndarray]:
            async with slots:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(f"deadline exceeded before {model!r} was called")
                sliced = {t.name: np.ascontiguousarray(inputs[t.name][start:start + chunk], dtype=t.dtype)
                          for t in spec.inputs}
                return await self.backend.infer(model, spec, sliced, remaining)

        tasks = [asyncio.ensure_future(run_chunk(start)) for start in range(0, rows, chunk)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            # Wait for the cancelled chunks, so their rows are not released while still on Triton.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return {name: np.concatenate([r[name] for r in results]) for name in spec.output_names}


def _context_rows(flow: FlowMetadata, context: np.ndarray | None, rows: int, rows_field: str) -> np.ndarray | None:
    """``context`` as [rows, context_dim], one context broadcast to every row; None for a flow
    without context. Raises InvalidArgument naming ``context`` for anything else."""
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
        return np.broadcast_to(context.reshape(1, flow.context_dim), (rows, flow.context_dim))
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
    finite = np.isfinite(context).reshape(rows, -1).all(axis=1)
    if not finite.all():
        raise InvalidArgument(f"context has non-finite values (NaN or inf) in row {int(np.argmin(finite))}")
    return context.reshape(rows, flow.context_dim)


def _inputs(spec: DirectionSpec, rows: np.ndarray, context: np.ndarray | None) -> dict[str, np.ndarray]:
    """Triton inputs of ``spec`` by name: ``rows`` as its first input, plus the context if it takes one."""
    inputs = {spec.input_names[0]: rows}
    if context is not None:
        inputs[CONTEXT] = context
    return inputs
