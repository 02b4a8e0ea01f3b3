"""The gateway's service layer: validation, noise, chunking and fan-out to Triton.

Protocol-agnostic: it takes and returns domain objects (``domain.py``) and raises domain
errors; the gRPC servicer is a thin adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowserve.spec import DENSITY, DIRECTIONS, GENERATION, direction_spec, read_all_metadata

from .domain import (
    FlowServeError,
    InvalidArgument,
    LogLikelihoodQuery,
    ModelInfo,
    ModelNotFound,
    ResourceExhausted,
    SampleQuery,
    SampleResult,
)
from .tensors import MAX_MESSAGE_BYTES, WIRE_DTYPE
from .triton import TritonBackend


# Room left in a message for everything but the tensor.
_MESSAGE_HEADROOM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    """Per-request and gateway-wide bounds on work."""

    max_rows_per_request: int = 100_000
    max_rows_in_flight: int = 1_000_000
    max_chunks_in_flight_per_request: int = 8

    def __post_init__(self):
        if self.max_rows_per_request < 1 or self.max_rows_in_flight < self.max_rows_per_request:
            raise ValueError("need 1 <= max_rows_per_request <= max_rows_in_flight")


@dataclass(frozen=True)
class ServedFlow:
    """A flow of the catalog: its event shape and the Triton model of each direction."""

    name: str
    family: str
    event_shape: tuple[int, ...]
    models: dict[str, str]
    metadata: dict[str, Any]

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)


def _flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


class ModelCatalog:
    """Flows described by the metadata files of a model repository.

    Unknown names trigger a re-read, at most once per ``min_reload_interval_s``, so a
    newly exported flow is found without a restart and a flood of bad names costs no
    disk reads.
    """

    def __init__(self, repository: Path, min_reload_interval_s: float = 1.0):
        self.repository = Path(repository)
        self.min_reload_interval_s = min_reload_interval_s
        self._flows: dict[str, ServedFlow] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read the repository's metadata files."""
        self._loaded_at = time.monotonic()
        flows = {}
        for name, meta in read_all_metadata(self.repository).items():
            flows[name] = ServedFlow(
                name=name,
                family=meta["family"],
                event_shape=tuple(meta["event_shape"]),
                models=dict(meta["models"]),
                metadata=meta,
            )
        self._flows = flows

    def names(self) -> list[str]:
        return sorted(self._flows)

    def get(self, name: str) -> ServedFlow:
        """The flow called ``name``; raises InvalidArgument if empty, ModelNotFound if unknown."""
        if not name:
            raise InvalidArgument("model must name a flow; ListModels lists them")
        if name not in self._flows and time.monotonic() - self._loaded_at >= self.min_reload_interval_s:
            self.reload()
        try:
            return self._flows[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} is not served; served models: {self.names()}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._flows


class FlowService:
    """Sample and LogLikelihood for every flow of the catalog, run on Triton."""

    def __init__(self, backend: TritonBackend, catalog: ModelCatalog, limits: GatewayLimits):
        self.backend = backend
        self.catalog = catalog
        self.limits = limits
        self._rows_in_flight = 0

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
                metadata=_flatten({k: v for k, v in flow.metadata.items() if k not in ("name", "models")}),
            ))
        return infos

    async def sample(self, query: SampleQuery, timeout: float | None = None) -> SampleResult:
        """Draw ``num_samples`` samples; the base noise comes from the seed alone."""
        flow = self.catalog.get(query.model)
        self._check_rows("num_samples", query.num_samples, flow.dim)
        if not (math.isfinite(query.temperature) and query.temperature > 0):
            raise InvalidArgument(f"temperature must be a finite number > 0, got {query.temperature}")
        seed = secrets.randbits(64) if query.seed is None else query.seed
        with self._reserve(query.num_samples):
            rng = np.random.Generator(np.random.PCG64(seed))
            noise = rng.standard_normal((query.num_samples, flow.dim), dtype=np.float32)
            noise *= np.float32(query.temperature)
            outputs = await self._run(flow, GENERATION, noise, timeout)
        samples = outputs["x"].reshape(query.num_samples, *flow.event_shape)
        log_prob = outputs["log_prob"] if query.return_log_prob else None
        return SampleResult(samples=samples, log_prob=log_prob, seed=seed)

    async def log_likelihood(self, query: LogLikelihoodQuery, timeout: float | None = None) -> np.ndarray:
        """Exact log p(x) of each row of ``query.x``."""
        flow = self.catalog.get(query.model)
        x = query.x
        if x.ndim != 1 + len(flow.event_shape) or tuple(x.shape[1:]) != flow.event_shape:
            raise InvalidArgument(
                f"x.shape is {list(x.shape)}; model {flow.name!r} expects [N, {', '.join(map(str, flow.event_shape))}]"
            )
        self._check_rows("x.shape[0]", x.shape[0], flow.dim)
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not finite.all():
            raise InvalidArgument(f"x has non-finite values (NaN or inf) in row {int(np.argmin(finite))}")
        with self._reserve(x.shape[0]):
            outputs = await self._run(flow, DENSITY, x.reshape(x.shape[0], flow.dim), timeout)
        return outputs["log_prob"]

    def _check_rows(self, field: str, rows: int, dim: int) -> None:
        if rows < 1:
            raise InvalidArgument(f"{field} must be >= 1, got {rows}")
        if rows > self.limits.max_rows_per_request:
            raise InvalidArgument(
                f"{field} is {rows}, above this gateway's limit of {self.limits.max_rows_per_request} rows per request"
            )
        # A row costs its D values plus its log_prob on the wire.
        max_rows = (MAX_MESSAGE_BYTES - _MESSAGE_HEADROOM_BYTES) // ((dim + 1) * WIRE_DTYPE.itemsize)
        if rows > max_rows:
            raise InvalidArgument(
                f"{field} is {rows}: at {dim} float32 values per row that exceeds the {MAX_MESSAGE_BYTES >> 20} MiB "
                f"message limit; send at most {max_rows} rows per request"
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
        self, flow: ServedFlow, direction: str, rows: np.ndarray, timeout: float | None
    ) -> dict[str, np.ndarray]:
        """Run ``rows`` through one direction in chunks of Triton's max_batch_size, concurrently."""
        model = flow.models[direction]
        spec = direction_spec(direction, flow.dim)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        chunk = await self.backend.max_batch_size(model)
        slots = asyncio.Semaphore(self.limits.max_chunks_in_flight_per_request)

        async def run_chunk(start: int) -> dict[str, np.ndarray]:
            async with slots:
                remaining = None if deadline is None else deadline - loop.time()
                inputs = {spec.inputs[0].name: np.ascontiguousarray(rows[start:start + chunk])}
                return await self.backend.infer(model, spec, inputs, remaining)

        tasks = [asyncio.ensure_future(run_chunk(start)) for start in range(0, rows.shape[0], chunk)]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            # Wait for the cancelled chunks, so their rows are not released while still on Triton.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return {name: np.concatenate([r[name] for r in results]) for name in spec.output_names}
