"""Assemble and run the gateway: the gRPC server, the HTTP/JSON API, health, reflection and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flowserve.server.protocol.names import SERVICE_NAME, flow_health_service
from flowserve.server.protocol.proto import flowserve_pb2_grpc as pb_grpc
from flowserve.server.protocol.tensors import MAX_MESSAGE_BYTES

from .auth import TokenAuthInterceptor, TokenCheck
from .backend import Backend
from .batching import BatchingBackend
from .calls import CallLedger
from .catalog import ModelCatalog
from .health import FlowHealth
from .interceptor import ErrorAndMetricsInterceptor
from .metrics import GatewayMetrics
from .rest.api import HttpApi
from .service import FlowService, GatewayLimits
from .servicer import FlowServicer
from .tls import ServerTLS
from .triton_backend import TritonBackend

log = logging.getLogger(__name__)

try:  # uvloop's event loop costs the gateway about 15% less CPU per RPC than asyncio's
    import uvloop
except ImportError:  # not built for this platform
    uvloop = None


def run_event_loop(main):
    """Run the coroutine ``main`` to completion on uvloop where it is installed, else asyncio."""
    return uvloop.run(main) if uvloop is not None else asyncio.run(main)


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus:
    return health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class GatewayConfig:
    """Where the gateway listens, which Triton it uses, and its limits; ``tls`` (None:
    plaintext) and ``tokens`` (empty: no token needed) secure the gRPC port."""

    model_repository: Path
    triton_url: str
    host: str = "0.0.0.0"
    port: int = 8500
    metrics_port: int | None = 8502
    """None: no metrics endpoint in this process (a worker of several: the parent has it)."""
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    health_interval_s: float = 1.0
    shutdown_grace_s: float = 10.0
    max_concurrent_rpcs: int | None = None
    """flowserve RPCs the gateway runs at once; more are refused with RESOURCE_EXHAUSTED (None: no limit)."""
    load_changes: bool = False
    """Load the models of flows whose files an export rewrote (``health.FlowHealth``): for a
    Triton of its own, in explicit model control mode."""
    manage_models: bool = True
    """Reload models that stop answering (and, with ``load_changes``, load changed flows); of
    several workers on one Triton only one does."""
    reuse_port: bool = False
    """Share the gRPC port with other processes that ask for it too (``SO_REUSEPORT``: gateway
    workers); without it a port already taken is an error."""
    tls: ServerTLS | None = None
    tokens: frozenset[str] = field(default=frozenset(), repr=False)
    http_port: int | None = None
    """The HTTP/JSON API's port (0: a free one; None: no HTTP API), with the same TLS and tokens."""
    cors_origins: frozenset[str] = frozenset()
    """Origins a browser may call the HTTP API from (``*``: any); none by default."""


class Gateway:
    """The gateway server; use as ``async with Gateway(config, backend) as gateway:``.

    It serves the flows of ``config.model_repository`` on ``backend`` and closes the
    backend when it stops.
    """

    def __init__(self, config: GatewayConfig, backend: Backend, metrics: GatewayMetrics | None = None):
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.backend = backend
        self.catalog = ModelCatalog(config.model_repository)
        batching = BatchingBackend(backend, config.limits.max_batches_in_flight_per_model)
        self.flow_health = FlowHealth(batching, self.catalog, self.metrics, manage_models=config.manage_models,
                                      load_changes=config.load_changes)
        self.service = FlowService(batching, self.catalog, config.limits, self.flow_health)
        self.health = health.aio.HealthServicer()
        self.calls = CallLedger(self.metrics, self.catalog.__contains__, config.max_concurrent_rpcs)
        self.token_check = TokenCheck(config.tokens) if config.tokens else None
        counting = ErrorAndMetricsInterceptor(self.calls)
        # Authentication comes first: a refused RPC never reaches a handler, and is counted by count_refused.
        authenticating = [] if self.token_check is None else [TokenAuthInterceptor(self.token_check,
                                                                                    counting.count_refused)]
        self.server = grpc.aio.server(
            interceptors=[*authenticating, counting],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", int(config.reuse_port)),  # gRPC's default on Linux is 1
            ],
        )
        self.serving = False
        """Triton is ready and the gateway is not shutting down (HTTP's /readyz)."""
        self._http: web.AppRunner | None = None
        if config.http_port is not None:
            api = HttpApi(self.service, self.calls, lambda: self.serving, self.token_check, config.cors_origins)
            self._http = web.AppRunner(api.application(), handler_cancellation=True, access_log=None,
                                       shutdown_timeout=config.shutdown_grace_s)
        self._metrics_http = None
        self._health_task: asyncio.Task | None = None
        self.port = 0
        self.http_port: int | None = None

    async def __aenter__(self) -> "Gateway":
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind the ports, start health polling and serve."""
        pb_grpc.add_FlowServiceServicer_to_server(FlowServicer(self.service), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, self.config.tls.credentials())
        if self.config.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(self.config.metrics_port, self.config.host)
        await self._update_health()
        self._health_task = asyncio.create_task(self._watch_health())
        await self.server.start()
        if self._http is not None:
            await self._http.setup()
            tls = self.config.tls
            site = web.TCPSite(self._http, self.config.host, self.config.http_port, reuse_port=self.config.reuse_port,
                               ssl_context=None if tls is None else tls.ssl_context())
            await site.start()
            self.http_port = self._http.addresses[0][1]
        log.info(
            "gateway on %s:%d (HTTP :%s, metrics :%s), Triton at %s, models %s", self.config.host, self.port,
            self.http_port, self.config.metrics_port, self.config.triton_url, self.catalog.names(),
        )

    async def _update_health(self) -> None:
        """The server's health (Triton ready) and each flow's (its models answer)."""
        ready = await self.backend.is_ready()
        self.serving = ready
        self.metrics.triton_ready.set(1.0 if ready else 0.0)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, _status(ready))
        for flow, flow_ready in (await self.flow_health.check(ready)).items():
            await self.health.set(flow_health_service(flow), _status(flow_ready))

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._update_health()
            except Exception:  # the watcher must outlive a bad poll
                log.exception("health poll failed")

    async def stop(self) -> None:
        """Stop accepting RPCs, let in-flight ones finish within the grace period, and close."""
        await self.health.enter_graceful_shutdown()
        self.serving = False
        if self._health_task:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        # Both transports stop taking calls and let theirs finish within the grace period.
        await asyncio.gather(self.server.stop(self.config.shutdown_grace_s),
                             *([] if self._http is None else [self._http.cleanup()]))
        await self.flow_health.close()
        await self.backend.close()
        if self._metrics_http is not None:
            await self.metrics.stop_http(self._metrics_http)
            self._metrics_http = None
        log.info("gateway stopped")


def print_ready(gateway: "Gateway") -> None:
    """The line a single gateway prints once it serves (what scripts wait for)."""
    config = gateway.config
    scheme = "https" if config.tls else "http"
    http = "" if gateway.http_port is None else f"HTTP {scheme}://{config.host}:{gateway.http_port}, "
    print(f"gateway ready: gRPC {config.host}:{gateway.port}, {http}"
          f"metrics http://{config.host}:{config.metrics_port}/metrics", flush=True)


async def run_gateway(config: GatewayConfig, metrics: GatewayMetrics | None = None,
                      watch: Callable[[], Awaitable[None]] | None = None,
                      on_ready: Callable[[Gateway], None] = print_ready,
                      signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> int:
    """Serve until one of ``signals`` (exit code 0), then shut down gracefully.

    ``watch()``, when given, runs beside the gateway: the embedded Triton's supervisor, say.
    If it raises (it gave up), the gateway shuts down gracefully with exit code 1.
    ``on_ready(gateway)`` is called once the gateway serves.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:  # kept until shutdown is over: a second signal waits too
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        async with Gateway(config, TritonBackend(config.triton_url), metrics) as gateway:
            on_ready(gateway)
            stopped = asyncio.ensure_future(stop.wait())
            watched = [asyncio.ensure_future(watch())] if watch else []
            await asyncio.wait([stopped, *watched], return_when=asyncio.FIRST_COMPLETED)
            for task in (stopped, *watched):
                task.cancel()
            for task in watched:
                if not task.cancelled() and task.done() and task.exception() is not None:
                    log.error("%s; shutting the gateway down", task.exception())
                    exit_code = 1
            await asyncio.gather(stopped, *watched, return_exceptions=True)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return exit_code
