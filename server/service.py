"""The gateway's service layer: validation, noise, chunking and fan-out to Triton.

Protocol-agnostic: it takes and returns domain objects (``domain.py``) and raises domain
errors; the gRPC servicer is a thin adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowserve.spec import (
    CONTEXT,
    DENSITY,
    DIRECTIONS,
    GENERATION,
    LOG_LIKELIHOOD_KINDS,
    DirectionSpec,
    bits_per_dim,
    direction_spec,
    read_all_metadata,
)

from .domain import (
    FlowServeError,
    InvalidArgument,
    LogLikelihoodQuery,
    LogLikelihoodResult,
    ModelInfo,
    ModelNotFound,
    ResourceExhausted,
    SampleQuery,
    SampleResult,
)
from .tensors import MAX_MESSAGE_BYTES, WIRE_DTYPE
from .triton import TritonBackend

log = logging.getLogger(__name__)

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
    """A flow of the catalog: its shapes, likelihood kind and the Triton model of each direction."""

    name: str
    family: str
    event_shape: tuple[int, ...]
    models: dict[str, str]
    metadata: dict[str, Any]
    noise_dim: int
    context_shape: tuple[int, ...] = ()
    log_likelihood: str = "exact"
    support: tuple[float, float] | None = None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ServedFlow":
        """The flow a metadata file describes; raises ValueError on a malformed shape, noise_dim or kind."""
        event_shape = _shape(meta["event_shape"], "event_shape")
        if not event_shape:
            raise ValueError("event_shape is empty")
        noise_dim = meta.get("noise_dim", math.prod(event_shape))
        if type(noise_dim) is not int or noise_dim < 1:
            raise ValueError(f"noise_dim must be a positive integer, got {noise_dim!r}")
        kind = meta.get("log_likelihood", "exact")
        if kind not in LOG_LIKELIHOOD_KINDS:
            raise ValueError(f"log_likelihood must be one of {LOG_LIKELIHOOD_KINDS}, got {kind!r}")
        models = meta["models"]
        if not isinstance(models, dict) or not all(isinstance(models.get(d), str) for d in DIRECTIONS):
            raise ValueError(f"models must map {list(DIRECTIONS)} to Triton model names, got {models!r}")
        support = meta.get("support")
        if support is not None and not (
            isinstance(support, list) and len(support) == 2
            and all(isinstance(v, (int, float)) for v in support) and support[0] < support[1]
        ):
            raise ValueError(f"support must be [low, high] with low < high, got {support!r}")
        return cls(
            name=meta["name"],
            family=meta["family"],
            event_shape=event_shape,
            models=dict(models),
            metadata=meta,
            noise_dim=noise_dim,
            context_shape=_shape(meta.get("context_shape", []), "context_shape"),
            log_likelihood=kind,
            support=None if support is None else (float(support[0]), float(support[1])),
        )

    @property
    def dim(self) -> int:
        """Values per event row as Triton sees it: prod(event_shape)."""
        return math.prod(self.event_shape)

    @property
    def context_dim(self) -> int:
        """Values per context row as Triton sees it; 0 when the flow takes no context."""
        return math.prod(self.context_shape) if self.context_shape else 0

    def spec(self, direction: str) -> DirectionSpec:
        """Triton tensors of ``direction`` of this flow."""
        return direction_spec(direction, self.dim, noise_dim=self.noise_dim, context_dim=self.context_dim)


def _shape(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or any(type(d) is not int or d < 1 for d in value):
        raise ValueError(f"{key} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


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
        self.version = 0  # bumped whenever a reload finds different flows
        self.reload()

    def reload(self) -> None:
        """Re-read the repository's metadata files."""
        self._loaded_at = time.monotonic()
        flows = {}
        for name, meta in read_all_metadata(self.repository).items():
            try:
                flows[name] = ServedFlow.from_metadata(meta)
            except ValueError as exc:
                log.warning("not serving flow %r: bad metadata: %s", name, exc)
        if flows != self._flows:
            self.version += 1
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
                metadata=_flatten({k: v for k, v in flow.metadata.items() if k not in ("name", "models")}),
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

    def _check_rows(self, field: str, rows: int, flow: ServedFlow) -> None:
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
        self, flow: ServedFlow, direction: str, inputs: dict[str, np.ndarray], timeout: float | None
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
        slots = asyncio.Semaphore(self.limits.max_chunks_in_flight_per_request)

        async def run_chunk(start: int) -> dict[str, np.ndarray]:
            async with slots:
                remaining = None if deadline is None else deadline - loop.time()
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


def _context_rows(flow: ServedFlow, context: np.ndarray | None, rows: int, rows_field: str) -> np.ndarray | None:
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
